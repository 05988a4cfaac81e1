"""A small GLUE release in the original TSV layout, written by the tests. Each task's label is carried by
one word in the first sentence, so a tiny model can learn it; STS-B's score is the count of 'same'. With
MNLI comes the diagnostic set AX (diagnostic/diagnostic.tsv: index, sentence1, sentence2, no labels)."""
from __future__ import annotations

import random
import zlib
from pathlib import Path

FILLER = "the a of movie film story plot day night river city man woman dog cat was is very quite".split()
CLASS_WORDS = {2: ("awful", "great"), 3: ("yes", "maybe", "no")}
LABELS = {"cola": ("0", "1"), "sst2": ("0", "1"), "mrpc": ("0", "1"), "qqp": ("0", "1"), "wnli": ("0", "1"),
          "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
          "rte": ("entailment", "not_entailment")}


def _sentence(rng: random.Random, word: str | None = None) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
    if word is not None:
        words.insert(rng.randrange(len(words) + 1), word)
    return " ".join(words)


def _rows(task: str, split: str, n: int, rng: random.Random, balance: float | None = None):
    """(index, text_a, text_b, label string) per example."""
    for i in range(n):
        if task == "stsb":
            k = rng.randint(0, 5)
            yield str(i), _sentence(rng, " ".join(["same"] * k) or None), _sentence(rng), f"{float(k):.3f}"
            continue
        labels = LABELS[task]
        # balance: the share of class 0 (an unbalanced split has a majority-class baseline above chance)
        c = rng.randrange(len(labels)) if balance is None else (0 if rng.random() < balance else
                                                                1 + rng.randrange(len(labels) - 1))
        yield str(i), _sentence(rng, CLASS_WORDS[len(labels)][c]), _sentence(rng), labels[c]


def write_task(root: Path, task: str, split: str, n: int, seed: int, balance: float | None = None) -> list[tuple]:
    rng = random.Random(zlib.crc32(f"{task}/{split}/{seed}".encode()))
    rows = list(_rows(task, split, n, rng, balance))
    test = split.startswith("test")
    folder = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}[task]
    lines = []
    for idx, a, b, label in rows:  # the column layouts of the GLUE release
        if task == "cola":
            lines.append(f"{idx}\t{a}" if test else f"src{idx}\t{label}\t\t{a}")
        elif task == "sst2":
            lines.append(f"{idx}\t{a}" if test else f"{a}\t{label}")
        elif task == "mrpc":
            lines.append(f"{idx}\t1{idx}\t2{idx}\t{a}\t{b}" if test else f"{label}\t1{idx}\t2{idx}\t{a}\t{b}")
        elif task == "qqp":
            lines.append(f"{idx}\t{a}\t{b}" if test else f"{idx}\t1{idx}\t2{idx}\t{a}\t{b}\t{label}")
        elif task == "stsb":
            lines.append(f"{idx}\tmain\tf\t2012\t{idx}\ts\ts\t{a}\t{b}" + ("" if test else f"\t{label}"))
        elif task == "mnli":
            lines.append(f"{idx}\tfiction\t{a}\t{b}" + ("" if test else f"\t{label}\t{label}"))
        else:
            lines.append(f"{idx}\t{a}\t{b}" + ("" if test else f"\t{label}"))
    header = {
        "cola": None if not test else "index\tsentence",
        "sst2": "index\tsentence" if test else "sentence\tlabel",
        "mrpc": ("index" if test else "Quality") + "\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "qqp": "id\tquestion1\tquestion2" if test else "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2" + ("" if test else "\tscore"),
        "mnli": "index\tgenre\tsentence1\tsentence2" + ("" if test else "\tlabel1\tgold_label"),
        "qnli": "index\tquestion\tsentence" + ("" if test else "\tlabel"),
    }.get(task, "index\tsentence1\tsentence2" + ("" if test else "\tlabel"))
    path = root / folder / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in ([header] if header else []) + lines))
    return rows


def write_diagnostic(root: Path, n: int, seed: int = 0) -> list[tuple]:
    """AX as the GLUE release has it: diagnostic/diagnostic.tsv with a header and no labels."""
    rng = random.Random(zlib.crc32(f"ax/diagnostic/{seed}".encode()))
    rows = list(_rows("mnli", "diagnostic", n, rng))
    path = root / "diagnostic" / "diagnostic.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("index\tsentence1\tsentence2\n" + "".join(f"{i}\t{a}\t{b}\n" for i, a, b, _ in rows))
    return rows


def write_glue(root: Path, tasks=None, n_train: int = 16, n_dev: int = 8, n_test: int = 6,
               n_diagnostic: int = 7, balance: float | None = None) -> dict:
    """Every split of every task (and AX, as ("ax", "diagnostic"), with MNLI); returns {(task, split): rows}.
    `balance`: the share of class 0 in every classification split (default: uniform draws)."""
    written = {}
    for task in tasks or ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"):
        dev = ("dev_matched", "dev_mismatched") if task == "mnli" else ("dev",)
        test = ("test_matched", "test_mismatched") if task == "mnli" else ("test",)
        for split, n in [("train", n_train)] + [(s, n_dev) for s in dev] + [(s, n_test) for s in test]:
            written[task, split] = write_task(root, task, split, n, 0, balance)
        if task == "mnli" and n_diagnostic:
            written["ax", "diagnostic"] = write_diagnostic(root, n_diagnostic)
    return written
