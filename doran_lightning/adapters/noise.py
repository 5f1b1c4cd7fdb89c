"""Deprecated module path (issue 41): σ and its parametrization live in `methods/doran.py`, with the rest of DoRAN's
math. Everything this module held is re-exported from there; import from `doran_lightning.adapters.methods.doran`.
"""

from doran_lightning.adapters.methods.doran import (  # noqa: F401  (re-exported)
    HALF_NORMAL_MEAN,
    RELATIVE_SHARPNESS,
    Noise,
    initial_rho,
    inverse_softplus,
    is_relative,
    median_row_norm,
    sigma_value,
)

__all__ = ["HALF_NORMAL_MEAN", "RELATIVE_SHARPNESS", "Noise", "initial_rho", "inverse_softplus", "is_relative",
           "median_row_norm", "sigma_value"]
