"""What each task scores: torchmetrics per evaluation stage, and causal-LM answers from generated text.

`build_metrics` gives the metric objects of one stage for classification and regression;
`GenerationScorer` generates greedy answers for causal-LM prompts and scores them per subset
(the DoRA / LLM-Adapters commonsense protocol: the datamodule's ``extract_answer`` reads the answer).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from doran_lightning import tags

Metric = Literal["accuracy", "matthews", "pearson_spearman", "f1_accuracy", "generation_accuracy"]
EVAL_STAGES = ("val", "test")


def _accuracies(num_classes: int) -> dict[str, nn.Module]:
    """``accuracy`` = the fraction of correct predictions (what ``predictions.csv`` counts); the mean per-class
    recall, which ``accuracy`` logged before issue 40 (torchmetrics' macro default), as ``balanced_accuracy``."""
    return {"accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_accuracy": MulticlassAccuracy(num_classes, average="macro")}


def build_metrics(metric: str, num_classes: int | None) -> dict[str, nn.Module]:
    """The torchmetrics objects of one evaluation stage, keyed by the name logged after `<stage>/`."""
    if metric == "generation_accuracy":
        return {}  # scored from generated text per subset (see GenerationScorer)
    if num_classes is None:
        raise ValueError(f"metric={metric!r} needs num_classes (linked from the datamodule)")
    if metric == "pearson_spearman":
        return {"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()}
    if num_classes < 2:
        raise ValueError(f"metric={metric!r} needs num_classes >= 2, got {num_classes}")
    if metric == "accuracy":
        return _accuracies(num_classes)
    if metric == "matthews":
        return {"matthews": MatthewsCorrCoef(task="multiclass", num_classes=num_classes)}
    if metric == "f1_accuracy":
        f1 = BinaryF1Score() if num_classes == 2 else MulticlassF1Score(num_classes, average="macro")
        return {"f1": f1, "accuracy": _accuracies(num_classes)["accuracy"]}  # GLUE's pair: F1 and plain accuracy
    raise ValueError(f"metric={metric!r}: expected one of accuracy, matthews, pearson_spearman, f1_accuracy, "
                     "generation_accuracy")


def generate_text(backbone: nn.Module, tokenizer: Any, batch: dict[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy continuation of the batch's (left-padded) prompts, decoded without the prompt."""
    if tokenizer is None:
        raise ValueError("causal_lm generation needs the datamodule's tokenizer (model.tokenizer is None)")
    prompts = batch["prompt_input_ids"]
    generated = backbone.generate(
        input_ids=prompts, attention_mask=batch["prompt_attention_mask"], max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(generated[:, prompts.shape[1]:], skip_special_tokens=True)


class GenerationScorer:
    """Exact-match accuracy of generated answers, per evaluation stage and per subset (one MeanMetric each)."""

    def __init__(self) -> None:
        self.scores: dict[str, dict[str, MeanMetric]] = {stage: {} for stage in EVAL_STAGES}

    def update(self, stage: str, batch: dict[str, Any], texts: list[str], datamodule: Any,
               device: torch.device) -> None:
        """Score one batch's generated `texts` against ``batch["answers"]`` with ``datamodule.extract_answer``."""
        if datamodule is None or not hasattr(datamodule, "extract_answer"):
            raise ValueError("generation_accuracy needs a datamodule with extract_answer(subset, text)")
        scores = self.scores[stage]
        for subset, text, answer in zip(batch["subset"], texts, batch["answers"]):
            predicted = datamodule.extract_answer(subset, text)
            if subset not in scores:
                scores[subset] = MeanMetric().to(device)
            scores[subset].update(float(predicted.strip().lower() == str(answer).strip().lower()))

    def compute(self, stage: str) -> dict[str, Tensor]:
        """{tag: value}: accuracy per subset and their mean (empty when nothing was scored); resets the stage."""
        scores = self.scores[stage]
        if not scores:
            return {}
        per_subset = {subset: metric.compute() for subset, metric in sorted(scores.items())}
        values = {tags.stage_tag(stage, f"accuracy/{subset}"): value for subset, value in per_subset.items()}
        values[tags.stage_tag(stage, "accuracy")] = torch.stack(list(per_subset.values())).mean()
        for metric in scores.values():
            metric.reset()
        return values
