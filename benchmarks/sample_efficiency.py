"""Sample-efficiency sweep: method variants × training fractions × seeds, with a per-method lr search.

Kept as a thin caller of `python -m doran_lightning sweep` (doran_lightning/sweep/, see docs/SCALING.md):
the same flags, the same cache (``<out>/runs/<variant>/<key>/result.json``, finished runs skipped,
interrupted ones resumed) and the same default output folder as before the verb existed.

Example (a few minutes on a laptop CPU):
    python benchmarks/sample_efficiency.py --config vit_tiny_digits.yaml --quick --out runs/quick
"""

from __future__ import annotations

import sys
from pathlib import Path

from doran_lightning.sweep import *  # noqa: F401,F403  (the names this script held: RunSpec, run_sweep, …)
from doran_lightning.sweep import cli as _cli

PROG = "python benchmarks/sample_efficiency.py"
DEFAULT_OUT = Path("benchmarks/results/sample_efficiency")


def build_parser():  # noqa: F811  (the verb's parser with this script's default --out)
    parser = _cli.build_parser(PROG)
    parser.set_defaults(out=DEFAULT_OUT)
    return parser


def main(argv: list[str] | None = None) -> int:  # noqa: F811
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg == "--out" or arg.startswith("--out=") or arg == "--status" for arg in argv):
        argv = [*argv, "--out", str(DEFAULT_OUT)]
    return _cli.main(argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
