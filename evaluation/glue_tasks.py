"""The nine GLUE tasks: where their text and labels are in the original TSV release and on the hub, and
how each split is read into examples. Offline clusters point `glue.data_dir` at the TSV folder
(CoLA/, SST-2/, MRPC/, QQP/, STS-B/, MNLI/, QNLI/, RTE/, WNLI/, each with train/dev/test files, and
diagnostic/diagnostic.tsv, the diagnostic set AX that the MNLI model labels). `validate_submission` checks a
submission folder as the benchmark's server would."""
from __future__ import annotations

import csv
import math
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
NLI3 = ("entailment", "neutral", "contradiction")
TASKS = {t.name: t for t in (
    Task("cola", "CoLA", "sentence", None, "label", BINARY, "sentence", None, ("CoLA",)),
    Task("sst2", "SST-2", "sentence", None, "label", BINARY, "sentence", None, ("SST-2",)),
    Task("mrpc", "MRPC", "#1 String", "#2 String", "Quality", BINARY, "sentence1", "sentence2", ("MRPC",)),
    Task("qqp", "QQP", "question1", "question2", "is_duplicate", BINARY, "question1", "question2", ("QQP",)),
    Task("stsb", "STS-B", "sentence1", "sentence2", "score", None, "sentence1", "sentence2", ("STS-B",)),
    Task("mnli", "MNLI", "sentence1", "sentence2", "gold_label", NLI3, "premise", "hypothesis",
         ("MNLI-m", "MNLI-mm")),
    Task("qnli", "QNLI", "question", "sentence", "label", NLI2, "question", "sentence", ("QNLI",)),
    Task("rte", "RTE", "sentence1", "sentence2", "label", NLI2, "sentence1", "sentence2", ("RTE",)),
    Task("wnli", "WNLI", "sentence1", "sentence2", "label", BINARY, "sentence1", "sentence2", ("WNLI",)),
)}
# The diagnostic set AX: sentence pairs without labels, predicted by the MNLI model (the hub's config "ax");
# in the GLUE release diagnostic/diagnostic.tsv, columns index, sentence1, sentence2
AX = Task("ax", "diagnostic", "sentence1", "sentence2", "label", NLI3, "premise", "hypothesis", ("AX",))
DIAGNOSTIC_SPLIT = "diagnostic"
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


def labelled(split: str) -> bool:
    """Whether a split carries gold labels: not the test splits, nor the diagnostic set."""
    return not (split.startswith("test") or split == DIAGNOSTIC_SPLIT)


def submission_files(task: Task) -> list[tuple[str, Task, str]]:
    """(file stem, the task whose file it is, split) of every submission file a fine-tune of `task` writes:
    its test splits, and for MNLI also AX, the diagnostic set its model labels."""
    files = [(stem, task, split) for stem, split in zip(task.submission, task.test_splits)]
    return files + ([(AX.submission[0], AX, DIAGNOSTIC_SPLIT)] if task.name == "mnli" else [])


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
    gold = labelled(split)
    needed = [task.text_a] + ([task.text_b] if task.text_b else []) + ([task.label] if gold else [])
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
        label = _parse_label(task, row[col[task.label]], where) if gold else None
        examples.append(Example(row[id_col] if id_col is not None else str(line - 2), row[col[task.text_a]],
                                row[col[task.text_b]] if task.text_b else None, label))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


HUB_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def read_hub(task: Task, split: str) -> list[Example]:
    """One split from the hub's GLUE dataset (labels are already class ids; -1 on test splits)."""
    import datasets

    hub_split = "test" if split == DIAGNOSTIC_SPLIT else HUB_SPLITS.get(split, split)
    try:
        rows = datasets.load_dataset(HUB_DATASET, task.name, split=hub_split)
    except Exception as e:  # offline or unreachable hub: say how to run without it
        raise DataError(f"GLUE {task.name} {split}: cannot load {HUB_DATASET} from the hub ({type(e).__name__}); "
                        f"set glue.data_dir to a folder in the GLUE TSV layout") from None
    gold = labelled(split)
    return [Example(str(row["idx"]), row[task.hub_a], row[task.hub_b] if task.hub_b else None,
                    (float(row["label"]) if task.is_regression else int(row["label"])) if gold else None)
            for row in rows]


def load_split(task: Task, split: str, data_dir: str | Path | None) -> list[Example]:
    return read_tsv(task, split, data_dir) if data_dir else read_hub(task, split)


# file stem -> (task, split) of every file the GLUE server accepts in a submission
SUBMISSION_FILES = {stem: (task, split) for t in TASKS.values() for stem, task, split in submission_files(t)}
SUBMISSION_HEADER = "index\tprediction"


def _check_prediction(task: Task, value: str) -> str | None:
    """What is wrong with one prediction of a submission file, or None."""
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        return None if 0.0 <= score <= 5.0 else f"prediction {value!r} is not a number in [0, 5]"
    return None if value in task.labels else f"prediction {value!r} is not one of {', '.join(task.labels)}"


def validate_submission(folder: str | Path, data_dir: str | Path | None = None, complete: bool = False) -> list[str]:
    """Check a submission folder as the GLUE server reads it and return the file stems it holds; the first
    problem raises DataError as one line naming the file (and line). Every file must be one the server
    accepts (CoLA.tsv, SST-2.tsv, MRPC.tsv, STS-B.tsv, QQP.tsv, MNLI-m.tsv, MNLI-mm.tsv, QNLI.tsv, RTE.tsv,
    WNLI.tsv, AX.tsv), start with the header `index<TAB>prediction` and hold one `index<TAB>prediction` row per
    example in its task's label vocabulary (0/1; entailment/neutral/contradiction for MNLI and AX;
    entailment/not_entailment for QNLI and RTE; a score in [0, 5] for STS-B). With `data_dir` (the GLUE TSV
    layout) each file must also have as many rows as its test file, with the test file's indices in order.
    `complete`: all eleven files must be there (what the server needs to score a submission)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such submission folder")
    accepted = ", ".join(f"{stem}.tsv" for stem in SUBMISSION_FILES)
    files = sorted(folder.iterdir())
    for path in files:
        if not path.is_file() or path.suffix != ".tsv" or path.stem not in SUBMISSION_FILES:
            raise DataError(f"{path}: not a file the GLUE server accepts (one of {accepted})")
    stems = [path.stem for path in files]
    missing = [f"{stem}.tsv" for stem in SUBMISSION_FILES if stem not in stems]
    if complete and missing:
        raise DataError(f"{folder}: incomplete GLUE submission, missing {', '.join(missing)}")
    for path in files:
        task, split = SUBMISSION_FILES[path.stem]
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        if not lines or lines[0] != SUBMISSION_HEADER:
            raise DataError(f"{path}:1: header {(lines or [''])[0]!r}, the server expects 'index\\tprediction'")
        indices = []
        for line_no, line in enumerate(lines[1:], start=2):
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(f"{path}:{line_no}: {len(fields)} columns, expected 2 (index, prediction)")
            problem = _check_prediction(task, fields[1])
            if problem:
                raise DataError(f"{path}:{line_no}: {problem} ({path.stem} labels)")
            indices.append(fields[0])
        if not indices:
            raise DataError(f"{path}: no predictions")
        if data_dir is not None and (Path(data_dir) / task.folder / f"{split}.tsv").is_file():
            expected = [e.index for e in read_tsv(task, split, data_dir)]
            test_file = Path(data_dir) / task.folder / f"{split}.tsv"
            if len(indices) != len(expected):
                raise DataError(f"{path}: {len(indices)} predictions, the test file {test_file} has "
                                f"{len(expected)} examples")
            wrong = next((i for i, (a, b) in enumerate(zip(indices, expected)) if a != b), None)
            if wrong is not None:
                raise DataError(f"{path}:{wrong + 2}: index {indices[wrong]!r}, the test file {test_file} has "
                                f"{expected[wrong]!r} there")
    return stems
