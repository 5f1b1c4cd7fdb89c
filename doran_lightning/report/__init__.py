"""`python -m doran_lightning report`: stability and sample-efficiency evidence from TensorBoard runs.

The package's parts, each importable on its own:

- ``runs``: event files, ``hparams.yaml`` and resumptions -> `Run` objects;
- ``groups``: a run's comparison group (task, data, backbone, budget): runs are compared within one only;
- ``statistics``: paired differences by seed, t and bootstrap intervals, the minimum detectable effect, verdicts;
- ``comparisons``: methods vs a reference method within a group, and the per-run CSV;
- ``analysis``: spikes, divergence, conditions, mean ± std over seeds (no files, no matplotlib);
- ``figures``: the PNG figures, and ``draw_heatmap``, the one heat-map drawer (also the dashboard's);
- ``markdown``: ``summary.md``;
- ``suites``: the paper-layout suite tables (VTAB-1K, GLUE, commonsense, other tasks);
- ``cli``: the command line, ``make_report`` and ``main``.

Every name that ``doran_lightning.report`` held as one module is still importable from here.
"""

from doran_lightning.report.analysis import (
    AXIS_KEYS, CONDITION_KEYS, DELTA_D, DELTA_M, DIVERGE_FACTOR, DIVERGE_WINDOW, LR_RANGE_TOLERANCE, METRIC_PRIORITY,
    RADIAL_GAIN, SIGMA, SPIKE_FACTOR, SPIKE_WINDOW, VARIANTS, alarm_counts, choose_metric, condition_keys,
    condition_label, delta_points, ema, fraction_table, group_runs, group_summary, loss_diverged, lr_sensitivity,
    mean_std, on_common_grid, pearson, run_stability, setting_label, spike_indices, variant_rank,
)
from doran_lightning.report.comparisons import DEFAULT_REFERENCE, compare_methods, write_runs_csv
from doran_lightning.report.groups import GROUP_FIELDS, group_label, run_group
from doran_lightning.report.statistics import (
    DEFAULT_MARGIN, Interval, StatisticsError, bootstrap_mde, crossed_bootstrap, decide, difference_p, holm,
    minimum_detectable_effect, paired_bootstrap, paired_by_seed, t_interval, tost_p, verdict,
)
from doran_lightning.report.cli import EXIT_USER_ERROR, build_parser, main, make_report, shown_command
from doran_lightning.report.figures import (
    draw_heatmap, plot_delta_scatter, plot_fraction, plot_lr_sensitivity, plot_projection_statistic, plot_sigma,
    plot_training_curves,
)
from doran_lightning.report.markdown import markdown_summary
from doran_lightning.report.runs import (
    HPARAM_ALIASES, ReportError, Run, Series, find_run_dirs, flatten, given_folders, load_alarm_messages,
    load_hparams, load_run, load_scalars, lookup_hparam, merge_resumptions, natural_key, resumed_from, saved_config,
    shown_name, task_of, variant_from_hparams, variant_from_path,
)
from doran_lightning.report.suites import SuiteTable, suite_tables, write_suites

__all__ = [name for name in dir() if not name.startswith("_")]
