"""The verbs of `python -m doran_lightning` and the top-level `--help` (no Lightning import: it prints at once).

LightningCLI's own top-level help knows only the Trainer's methods (fit … export); `report` and `sweep` are routed
before it, so the one list of every verb, each with one line, lives here.
"""

from __future__ import annotations

PROG = "python -m doran_lightning"
HELP_FLAGS = ("-h", "--help")

# Verb -> one line. The Trainer verbs run through LightningCLI; report and sweep have parsers of their own.
VERBS: dict[str, str] = {
    "fit": "train adapters on a backbone; checkpoints and TensorBoard events go to the run folder",
    "validate": "score a model or checkpoint (--ckpt_path) on the validation split",
    "test": "score a checkpoint (--ckpt_path) on the test split",
    "predict": "write predictions.csv / predictions.jsonl for a checkpoint (your own inputs: --data.predict_file)",
    "export": "write adapters/, merged/ and peft/ folders from a checkpoint (--ckpt_path, --out)",
    "report": "figures and a Markdown summary comparing finished runs (TensorBoard log folders)",
    "sweep": "run methods x learning rates x seeds from a config and print the comparison table",
}


def wants_top_help(args: list[str]) -> bool:
    """True for `--help` / `-h` given before any verb (a verb's own help goes to that verb's parser)."""
    for arg in args:
        if arg in VERBS:
            return False
        if arg in HELP_FLAGS:
            return True
    return False


def top_help() -> str:
    """The usage line, every verb with its line, and where each verb's own options are listed."""
    width = max(map(len, VERBS))
    lines = [f"usage: {PROG} [-c CONFIG] {{{','.join(VERBS)}}} ...", "",
             "LoRA, DoRA and DoRAN fine-tuning with PyTorch Lightning.", "", "commands:"]
    lines += [f"  {verb.ljust(width)}  {line}" for verb, line in VERBS.items()]
    lines += ["", "options:",
              "  -h, --help            show this help message and exit",
              "  -c CONFIG, --config CONFIG",
              "                        a YAML config: a file, or the name of a shipped config (e.g. minilm_text.yaml)",
              "  --verbose             show every library line and warning that the quiet console leaves out", "",
              f"`{PROG} COMMAND --help` lists a command's options, e.g. `{PROG} fit --help`."]
    return "\n".join(lines)
