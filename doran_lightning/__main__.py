"""`python -m doran_lightning …` runs the LightningCLI."""

from doran_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
