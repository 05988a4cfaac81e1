"""GLUE's official metrics per task and the benchmark score (scikit-learn and scipy compute them)."""
from __future__ import annotations

import numpy as np

# task -> the metrics whose unweighted mean is the task's score (GLUE paper, section 4)
TASK_SCORE = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy_matched", "accuracy_mismatched"),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def split_metrics(task: str, predictions, labels) -> dict[str, float]:
    """Metrics of one evaluation split: class ids (or STS-B scores) against the gold labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task == "stsb":
        return {"pearson": float(pearsonr(predictions, labels)[0]), "spearman": float(spearmanr(predictions, labels)[0])}
    metrics = {"accuracy": float(accuracy_score(labels, predictions))}
    if task == "cola":
        metrics["matthews_correlation"] = float(matthews_corrcoef(labels, predictions))
    if task in ("mrpc", "qqp"):
        metrics["f1"] = float(f1_score(labels, predictions))
    return metrics


def task_score(task: str, metrics: dict[str, float]) -> float:
    """The task's GLUE score in percent."""
    return 100 * float(np.mean([metrics[name] for name in TASK_SCORE[task]]))


def glue_score(scores: dict[str, float]) -> float | None:
    """The benchmark score: the mean of the nine task scores (None unless all nine were run)."""
    return float(np.mean(list(scores.values()))) if set(scores) == set(TASK_SCORE) else None
