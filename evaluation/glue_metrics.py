"""GLUE's official metrics per task and the benchmark score (scikit-learn and scipy compute them)."""
from __future__ import annotations

import math

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
        if np.ptp(predictions) == 0 or np.ptp(labels) == 0:  # a constant has no correlation (scipy: nan)
            return {"pearson": 0.0, "spearman": 0.0}
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


# a regression whose predictions spread less than this share of the labels' spread predicts a constant
NEAR_CONSTANT_STD_RATIO = 0.01


def constant_prediction(task: str, predictions, labels, label_names=None) -> dict | None:
    """What a degenerate fine-tune did on one evaluation split, or None where its predictions vary: every
    prediction the same class (classification), or a spread under NEAR_CONSTANT_STD_RATIO of the labels'
    (STS-B). A classifier's record names the predicted class and the majority-class baseline: its accuracy
    and its task metrics (predicting one class everywhere scores exactly the baseline of that class), so a
    table can say that the score was not learned."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task == "stsb":
        spread, label_spread = float(np.std(predictions)), float(np.std(labels))
        if spread > NEAR_CONSTANT_STD_RATIO * label_spread:
            return None
        return {"kind": "near_constant", "prediction_mean": float(np.mean(predictions)), "prediction_std": spread,
                "label_std": label_spread, "std_ratio": spread / label_spread if label_spread else math.nan}
    classes = np.unique(predictions)
    if len(classes) != 1:
        return None
    name = (lambda c: label_names[int(c)] if label_names is not None else str(int(c)))
    values, counts = np.unique(labels, return_counts=True)
    majority = values[np.argmax(counts)]
    baseline = split_metrics(task, np.full_like(labels, majority), labels)
    return {"kind": "constant_prediction", "predicted_class": name(classes[0]), "majority_class": name(majority),
            "accuracy": float(np.mean(predictions == labels)), "majority_accuracy": baseline["accuracy"],
            "majority_baseline": baseline}


def degenerate_note(task: str, record: dict) -> str:
    """One line saying what a constant_prediction() record means, for the table, the log and results.json."""
    if record["kind"] == "near_constant":
        return (f"near-constant prediction ({record['prediction_mean']:.3f} +- {record['prediction_std']:.2g}, "
                f"labels' std {record['label_std']:.3f}): nothing was learned")
    same = record["predicted_class"] == record["majority_class"]
    return (f"all one class ({record['predicted_class']!r} for every example): accuracy "
            f"{100 * record['accuracy']:.2f} " + ("equals the majority baseline" if same else
                                                 f"vs majority baseline {100 * record['majority_accuracy']:.2f} "
                                                 f"(class {record['majority_class']!r})")
            + ", nothing was learned")


def majority_accuracy(labels) -> float:
    """The accuracy of predicting the most frequent gold class for every example."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())
