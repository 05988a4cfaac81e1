"""The nine GLUE tasks: where their text and labels are in the original TSV release and on the hub, and
how each split is read into examples. Offline clusters point `glue.data_dir` at the TSV folder
(CoLA/, SST-2/, MRPC/, QQP/, STS-B/, MNLI/, QNLI/, RTE/, WNLI/, each with train/dev/test files)."""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from ssmforge.errors import ConfigError, DataError

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class Task:
    name: str
    folder: str  # TSV folder in the GLUE release
    text_a: str  # TSV column
    text_b: str | None
    label: str  # TSV column of the gold label
    labels: tuple[str, ...] | None  # label strings, index = class id (the hub's order); None: regression
    hub_a: str  # field names in the hub dataset
    hub_b: str | None
    submission: tuple[str, ...]  # benchmark submission file stem per evaluation split

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def dev_splits(self) -> tuple[str, ...]:
        return ("dev_matched", "dev_mismatched") if self.name == "mnli" else ("dev",)

    @property
    def test_splits(self) -> tuple[str, ...]:
        return ("test_matched", "test_mismatched") if self.name == "mnli" else ("test",)


BINARY = ("0", "1")
NLI2 = ("entailment", "not_entailment")
TASKS = {t.name: t for t in (
    Task("cola", "CoLA", "sentence", None, "label", BINARY, "sentence", None, ("CoLA",)),
    Task("sst2", "SST-2", "sentence", None, "label", BINARY, "sentence", None, ("SST-2",)),
    Task("mrpc", "MRPC", "#1 String", "#2 String", "Quality", BINARY, "sentence1", "sentence2", ("MRPC",)),
    Task("qqp", "QQP", "question1", "question2", "is_duplicate", BINARY, "question1", "question2", ("QQP",)),
    Task("stsb", "STS-B", "sentence1", "sentence2", "score", None, "sentence1", "sentence2", ("STS-B",)),
    Task("mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
         "premise", "hypothesis", ("MNLI-m", "MNLI-mm")),
    Task("qnli", "QNLI", "question", "sentence", "label", NLI2, "question", "sentence", ("QNLI",)),
    Task("rte", "RTE", "sentence1", "sentence2", "label", NLI2, "sentence1", "sentence2", ("RTE",)),
    Task("wnli", "WNLI", "sentence1", "sentence2", "label", BINARY, "sentence1", "sentence2", ("WNLI",)),
)}
COLA_COLUMNS = ("source", "label", "original_label", "sentence")  # CoLA's train/dev files have no header


@dataclass(frozen=True)
class Example:
    index: str  # the row's id in the benchmark (submission files are keyed by it)
    text_a: str
    text_b: str | None
    label: float | int | None  # class id, a score for STS-B, None on test splits


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown GLUE task {name!r}: one of {', '.join(TASKS)} or all")
    return TASKS[name]


def _parse_label(task: Task, raw: str, where: str) -> float | int:
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: label {raw!r} is not a number (STS-B scores are 0 to 5)") from None
    if raw not in task.labels:
        raise DataError(f"{where}: label {raw!r} is not one of {task.name}'s labels {list(task.labels)}")
    return task.labels.index(raw)


def split_path(task: Task, split: str, data_dir: str | Path) -> Path:
    """`data_dir/<Folder>/<split>.tsv`, which must exist."""
    path = Path(data_dir) / task.folder / f"{split}.tsv"
    if not path.is_file():
        raise DataError(f"{path}: missing {task.name} {split} split (expected the GLUE TSV layout "
                        f"{task.folder}/{split}.tsv under glue.data_dir)")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return path


def check_data_dir(tasks, data_dir: str | Path, where: str = "glue.data_dir") -> None:
    """Before any work: `data_dir` (named as `where` says it was given) holds every split each task trains
    and is scored on (test splits are optional: without one, no submission file)."""
    if not Path(data_dir).is_dir():
        raise DataError(f"{where} {data_dir}: no such folder (expected the GLUE TSV layout: "
                        f"{', '.join(t.folder + '/' for t in TASKS.values())})")
    for task in tasks:
        for split in ("train",) + task.dev_splits:
            split_path(task, split, data_dir)


def read_tsv(task: Task, split: str, data_dir: str | Path) -> list[Example]:
    """One split of a task from the GLUE TSV layout: `data_dir/<Folder>/<split>.tsv`."""
    path = split_path(task, split, data_dir)
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    headerless = task.name == "cola" and not split.startswith("test")
    header = list(COLA_COLUMNS) if headerless else (rows.pop(0) if rows else [])
    labelled = not split.startswith("test")
    needed = [task.text_a] + ([task.text_b] if task.text_b else []) + ([task.label] if labelled else [])
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path}: no column(s) {missing} in the header {header}")
    col = {name: header.index(name) for name in needed}
    id_col = next((header.index(c) for c in ("index", "id") if c in header), None)
    examples = []
    for line, row in enumerate(rows, start=1 if headerless else 2):
        where = f"{path}:{line}"
        if len(row) < len(header) and any(col[c] >= len(row) for c in needed):
            raise DataError(f"{where}: {len(row)} columns, the header has {len(header)}")
        label = _parse_label(task, row[col[task.label]], where) if labelled else None
        examples.append(Example(row[id_col] if id_col is not None else str(line - 2), row[col[task.text_a]],
                                row[col[task.text_b]] if task.text_b else None, label))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


HUB_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def read_hub(task: Task, split: str) -> list[Example]:
    """One split from the hub's GLUE dataset (labels are already class ids; -1 on test splits)."""
    import datasets

    hub_split = HUB_SPLITS.get(split, split)
    try:
        rows = datasets.load_dataset(HUB_DATASET, task.name, split=hub_split)
    except Exception as e:  # offline or unreachable hub: say how to run without it
        raise DataError(f"GLUE {task.name} {split}: cannot load {HUB_DATASET} from the hub ({type(e).__name__}); "
                        f"set glue.data_dir to a folder in the GLUE TSV layout") from None
    labelled = not split.startswith("test")
    return [Example(str(row["idx"]), row[task.hub_a], row[task.hub_b] if task.hub_b else None,
                    (float(row["label"]) if task.is_regression else int(row["label"])) if labelled else None)
            for row in rows]


def load_split(task: Task, split: str, data_dir: str | Path | None) -> list[Example]:
    return read_tsv(task, split, data_dir) if data_dir else read_hub(task, split)
