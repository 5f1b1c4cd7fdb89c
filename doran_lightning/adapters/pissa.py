"""Deprecated module path (issue 41): PiSSA lives in `methods/pissa.py`, one file per method; re-exported here."""

from doran_lightning.adapters.methods.pissa import DoRAPiSSA, PiSSA, PrincipalInit  # noqa: F401  (re-exported)

__all__ = ["DoRAPiSSA", "PiSSA", "PrincipalInit"]
