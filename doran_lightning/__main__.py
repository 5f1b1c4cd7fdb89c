"""`python -m doran_lightning …` runs the LightningCLI (`report` and `sweep` start without importing Lightning)."""

import sys
from importlib import import_module

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("report", "sweep"):
        raise SystemExit(import_module(f"doran_lightning.{sys.argv[1]}").main(sys.argv[2:]))
    from doran_lightning.cli import main

    raise SystemExit(main())
