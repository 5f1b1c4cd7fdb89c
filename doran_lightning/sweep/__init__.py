"""`python -m doran_lightning sweep`: the paper's tables with one command, on one machine or a SLURM cluster.

- ``plan``: `RunSpec` (one run, hashed by content), configs, the method × task × fraction × seed grid;
- ``runs``: one run's folder, `fit` + `test`, resume from ``last.ckpt``, the cached result;
- ``executors``: ``local`` (N runs at once, one GPU group each) and ``slurm`` (a submitit job array);
- ``progress``: the live line, failures with their log tails, ``--status``;
- ``cli``: the command line and ``run_sweep``.

The suite task lists live in ``doran_lightning.data.suites``; the tables are ``report``'s.
"""

from doran_lightning.sweep.cli import (
    DEFAULT_FRACTIONS, DEFAULT_LRS, DEFAULT_SEEDS, QUICK_LIMITS, aggregate, build_parser, main, markdown_table,
    resolve_defaults, run_sweep, score, select_lrs,
)
from doran_lightning.sweep.executors import LocalExecutor, SlurmExecutor, SlurmOptions, run_job
from doran_lightning.sweep.plan import (
    DEFAULT_METHODS, KEY_TARGETS, VARIANT_SWITCHES, RunSpec, SweepError, plan_runs, plan_search, resolve_config,
    with_key_targets,
)
from doran_lightning.sweep.progress import status_table
from doran_lightning.sweep.runs import OFFLINE_ENV, Launcher, ResultCache, execute, find_checkpoint, subprocess_launcher

__all__ = [name for name in dir() if not name.startswith("_")]
