"""Adapter methods, one file each (issue 41): what LoRA, DoRA, DoRAN and PiSSA are.

* `base.py` — `AdapterMethod`, what every method does (its parts, init from W0, per-step values, merge, PEFT export),
  and `method_for`;
* `lora.py`, `dora.py` — LoRA and DoRA;
* `doran.py` — DoRAN's math top to bottom: σ (`Noise`), the denominator, the generated factors, g;
* `pissa.py` — PiSSA for LoRA and DoRA (`pissa`, `dora-pissa`), the worked example of docs/ADAPTERS.md.

Importing this package registers them all (`registry.method_names()` imports it first). The import path
``doran_lightning.adapters.methods`` (``AdapterMethod``, ``LoRA``, ``DoRA``, ``DoRAN``, ``method_for``) is unchanged.
"""

from doran_lightning.adapters.methods.base import AdapterMethod, method_for
from doran_lightning.adapters.methods.lora import LoRA
from doran_lightning.adapters.methods.dora import DoRA
from doran_lightning.adapters.methods.doran import DoRAN
from doran_lightning.adapters.methods.pissa import DoRAPiSSA, PiSSA

__all__ = ["AdapterMethod", "DoRA", "DoRAN", "DoRAPiSSA", "LoRA", "PiSSA", "method_for"]
