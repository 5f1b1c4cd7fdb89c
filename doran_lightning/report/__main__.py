"""`python -m doran_lightning.report …`, the same as `python -m doran_lightning report …`."""

from doran_lightning.report.cli import main

raise SystemExit(main())
