"""Generated A/B move like LoRA's static ones in the first Adam steps (issue 11, METHOD.md §3).

With Adam every generator weight moves by about lr per step, so an output entry A_ij = Σ_k H_ik W2_jk
moves by about lr·Σ_k|H_ik|: far more than a free LoRA entry (lr) unless the generators' lr is scaled
down (`AdapterConfig.aux_lr_scale`, applied by `adapter_param_groups`). `benchmarks/aux_dynamics.py` measures the per-element RMS change over steps 0-2 (a 2-layer BERT,
the same lr); the parametrization must keep generated/static within 1.5x for A and for B.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("aux_dynamics", ROOT / "benchmarks" / "aux_dynamics.py")
aux_dynamics = importlib.util.module_from_spec(_spec)
sys.modules["aux_dynamics"] = aux_dynamics
_spec.loader.exec_module(aux_dynamics)


def pooled_ratio(**overrides) -> dict[str, float]:
    """Geometric mean over 3 seeds of generated/static RMS change, for A and for B."""
    ratios = [aux_dynamics.movement_ratio(lr=1e-3, seed=seed, **overrides) for seed in range(3)]
    return {f: math.exp(sum(math.log(r[f]) for r in ratios) / len(ratios)) for f in ("A", "B")}


@pytest.mark.parametrize("hidden", [None, 32])
def test_generated_factors_move_like_static_ones(hidden):
    ratio = pooled_ratio(aux_hidden=hidden)
    assert 1 / 1.5 <= ratio["A"] <= 1.5 and 1 / 1.5 <= ratio["B"] <= 1.5, ratio


def test_without_the_head_scale_the_generated_factors_lead():
    """At the unscaled lr (the default before issue 11) the generated A and B move about 2-4x as far."""
    ratio = pooled_ratio(aux_lr_scale="none")
    assert ratio["A"] > 2 and ratio["B"] > 1.5, ratio
