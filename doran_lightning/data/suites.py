"""The benchmark suites' task lists: the one home of which tasks a paper table holds and how they group.

Importing this module is cheap (no torch): the sweep's planner and `report`'s suite tables read it,
and the data modules take their task names from it.

- VTAB-1K: 19 tasks in three groups (Natural 7, Specialized 4, Structured 8), with class counts;
- GLUE: the 8 tasks papers report (WNLI left out, as in RoBERTa/LoRA), each with its official metric;
- commonsense reasoning: the 8 test sets of one training run (LLM-Adapters' ``commonsense_170k``).
"""

from __future__ import annotations

# VTAB-1K under the folder names of the community's prepared release: group -> {task: number of classes}.
VTAB_GROUPS: dict[str, dict[str, int]] = {
    "natural": {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                "svhn": 10, "sun397": 397},
    "specialized": {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5},
    "structured": {"clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
                   "smallnorb_azi": 18, "smallnorb_ele": 9},
}
VTAB_NUM_CLASSES: dict[str, int] = {task: n for group in VTAB_GROUPS.values() for task, n in group.items()}

# GLUE task (GLUEDataModule's name) -> its official metric, as DoranModule's `metric` names it. A metric of
# two parts (f1_accuracy, pearson_spearman) is scored as the mean of its parts, as GLUE's leaderboard does.
GLUE_METRICS: dict[str, str] = {
    "cola": "matthews", "sst2": "accuracy", "mrpc": "f1_accuracy", "qqp": "f1_accuracy",
    "stsb": "pearson_spearman", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
}
# The logged parts of a metric of several parts (DoranModule.build_metrics logs each under <stage>/<part>).
METRIC_PARTS: dict[str, tuple[str, ...]] = {"f1_accuracy": ("f1", "accuracy"), "pearson_spearman": ("pearson", "spearman")}
GLUE_SUITE: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")

COMMONSENSE_SETS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")

# Suite name -> the task names a sweep runs (each one `--data.task=<name>` run per method and seed). The
# commonsense suite is one training run scored on its 8 sets, so it holds no task to pass.
SUITES: dict[str, tuple[str, ...]] = {
    "vtab-1k": tuple(VTAB_NUM_CLASSES),
    **{f"vtab-{group}": tuple(tasks) for group, tasks in VTAB_GROUPS.items()},
    "glue": GLUE_SUITE,
    "commonsense": (),
}


def expand_tasks(names: list[str]) -> list[str | None]:
    """``--tasks`` entries with suite names replaced by their tasks (order kept, duplicates dropped).

    ``commonsense`` contributes one run without a task override (``None``).
    """
    tasks: list[str | None] = []
    for name in names:
        key = name.lower()
        members: tuple[str | None, ...] = (None,) if key == "commonsense" else SUITES.get(key, (name,))
        tasks += [task for task in members if task not in tasks]
    return tasks


def vtab_group(task: str) -> str | None:
    """The VTAB-1K group of ``task`` (``natural``, ``specialized``, ``structured``), None for other tasks."""
    return next((group for group, tasks in VTAB_GROUPS.items() if task in tasks), None)
