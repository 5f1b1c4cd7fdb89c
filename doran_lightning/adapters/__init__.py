"""LoRA, DoRA and DoRAN adapters for any nn.Module — plain PyTorch, no Lightning (METHOD.md)."""

from doran_lightning.adapters.generators import AuxGenerator
from doran_lightning.adapters.config import AdapterConfig
from doran_lightning.adapters.inject import (
    adapted_modules,
    adapter_config,
    apply_adapters,
    merge_adapters,
    reset_magnitudes,
    resolve_targets,
    unmerge_adapters,
)
from doran_lightning.adapters.io import adapter_state_dict, export_peft, load_adapters, save_adapters
from doran_lightning.adapters.layer import AdaptedLinear
from doran_lightning.adapters.methods import AdapterMethod  # registers lora, dora, doran, pissa, dora-pissa
from doran_lightning.adapters.registry import method_names, register_method
from doran_lightning.adapters.params import adapter_param_groups, count_parameters
from doran_lightning.adapters.stats import adapter_histograms, adapter_statistics, generator_grad_norms

__all__ = [
    "AdaptedLinear", "AdapterConfig", "AdapterMethod", "AuxGenerator", "adapted_modules", "adapter_config",
    "adapter_histograms", "adapter_param_groups", "adapter_state_dict", "adapter_statistics", "apply_adapters",
    "count_parameters", "export_peft", "generator_grad_norms", "load_adapters", "merge_adapters", "method_names",
    "register_method", "reset_magnitudes", "resolve_targets", "save_adapters", "unmerge_adapters",
]
