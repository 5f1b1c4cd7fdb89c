"""LightningDataModules for the vision and language benchmarks (see vision.py, mnist.py, language.py, banking.py).

Names are re-exported lazily so that using the vision modules does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VTAB1kDataModule": "vision",
    "FGVCDataModule": "vision",
    "ImageFolderDataModule": "vision",
    "DigitsDataModule": "vision",
    "MNIST5kDataModule": "mnist",
    "GLUEDataModule": "language",
    "TextClassificationDataModule": "language",
    "CommonsenseDataModule": "language",
    "BuiltinTextDataModule": "language",
    "Banking77DataModule": "banking",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
