"""`python -m doran_lightning …` runs the LightningCLI (`report` and `sweep` start without importing Lightning)."""

import sys
from importlib import import_module

if __name__ == "__main__":
    from doran_lightning.commands import top_help, wants_top_help

    if wants_top_help(sys.argv[1:]):
        print(top_help())
        raise SystemExit(0)
    if len(sys.argv) > 1 and sys.argv[1] in ("report", "sweep"):
        raise SystemExit(import_module(f"doran_lightning.{sys.argv[1]}").main(sys.argv[2:]))
    from doran_lightning.cli import main

    raise SystemExit(main())
