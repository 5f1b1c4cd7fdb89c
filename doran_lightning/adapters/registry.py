"""The method registry: `AdapterConfig.method` names an `methods.AdapterMethod` subclass registered here.

Kept free of imports so that the config can validate against it; the built-in methods register themselves when
`doran_lightning.adapters.methods` is imported (the package imports it), a new one with `register_method`.
"""

from __future__ import annotations

import importlib
from typing import Any

_METHODS: dict[str, Any] = {}
_BUILT_IN = "doran_lightning.adapters.methods"


def register_method(method: Any) -> Any:
    """Register an `AdapterMethod` subclass under its ``name`` (usable as a class decorator)."""
    _METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    if not _METHODS:
        importlib.import_module(_BUILT_IN)  # registers the built-in methods
    return tuple(_METHODS)


def method_class(name: str) -> Any:
    """The method class registered as `name`; ValueError naming the known ones otherwise."""
    if name not in method_names():
        raise ValueError(f"AdapterConfig.method: unknown method {name!r}; registered methods: {', '.join(_METHODS)}")
    return _METHODS[name]
