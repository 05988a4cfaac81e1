import json
import math
import subprocess

import numpy as np
import pytest

from ssmforge.data_pipeline.tokenizer import ByteTokenizer
from ssmforge.evaluation.glue import TaskResult, encode_example, rank_indices, write_results
from ssmforge.evaluation.glue_metrics import TASK_SCORE, constant_prediction, glue_score, split_metrics, task_score
from ssmforge.evaluation.glue_tasks import (AX, DIAGNOSTIC_SPLIT, SUBMISSION_FILES, TASKS, Example, get_task, read_tsv,
                                            validate_submission)
from ssmforge.errors import ConfigError, DataError

from .conftest import ROOT, ssmforge
from .glue_fixture import LABELS, write_glue

# the file names the GLUE server accepts
SERVER_FILES = {"CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI", "AX"}


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    return root, write_glue(root)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_reads_its_tsv_layout(glue_dir, name):
    root, written = glue_dir
    task = TASKS[name]
    for split in ("train",) + task.dev_splits + task.test_splits:
        rows = written[name, split]
        examples = read_tsv(task, split, root)
        assert [e.text_a for e in examples] == [r[1] for r in rows]
        assert [e.text_b for e in examples] == ([r[2] for r in rows] if task.text_b else [None] * len(rows))
        if split.startswith("test"):
            assert all(e.label is None for e in examples)
            assert [e.index for e in examples] == [r[0] for r in rows]
        elif task.is_regression:
            assert [e.label for e in examples] == [float(r[3]) for r in rows]
        else:
            assert [e.label for e in examples] == [LABELS[name].index(r[3]) for r in rows]


def test_the_diagnostic_set_reads_from_the_release_layout(glue_dir):
    root, written = glue_dir
    examples = read_tsv(AX, DIAGNOSTIC_SPLIT, root)
    rows = written["ax", "diagnostic"]
    assert (root / "diagnostic" / "diagnostic.tsv").is_file()
    assert [(e.index, e.text_a, e.text_b, e.label) for e in examples] == [(r[0], r[1], r[2], None) for r in rows]


def test_label_outside_the_label_set_is_named_with_file_and_line(tmp_path):
    write_glue(tmp_path, ["rte"])
    path = tmp_path / "RTE" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tmaybe"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"RTE/dev.tsv:4: label 'maybe' is not one of rte's labels"):
        read_tsv(TASKS["rte"], "dev", tmp_path)


def test_missing_split_and_unknown_task_are_clear(tmp_path):
    write_glue(tmp_path, ["sst2"])
    (tmp_path / "SST-2" / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"SST-2/dev.tsv: missing sst2 dev split"):
        read_tsv(TASKS["sst2"], "dev", tmp_path)
    with pytest.raises(ConfigError, match="unknown GLUE task 'sts'"):
        get_task("sts")


def test_pairs_are_framed_and_the_longer_sentence_is_cut_first():
    tok = ByteTokenizer()
    ids = encode_example(tok, Example("0", "abcdefgh", "xy", 0), max_length=9)
    assert ids == [tok.eos_id] + tok.encode("abcd") + [tok.eos_id] + tok.encode("xy") + [tok.eos_id]
    assert encode_example(tok, Example("0", "ab", None, 0), 16) == [tok.eos_id] + tok.encode("ab") + [tok.eos_id]


def test_inputs_start_with_the_token_training_put_before_documents():
    """Packed pretraining data never feeds BOS: every document follows an EOS, so GLUE inputs start with EOS
    unless the run's manifest says its documents followed BOS."""
    tok = ByteTokenizer()
    example = Example("0", "ab", "c", 0)
    assert encode_example(tok, example, 16)[0] == tok.eos_id != tok.bos_id
    assert encode_example(tok, example, 16, document_prefix="bos") == \
        [tok.bos_id] + tok.encode("ab") + [tok.eos_id] + tok.encode("c") + [tok.eos_id]


def test_rank_shares_cover_everything_with_equal_counts():
    shares = [rank_indices(10, r, 4) for r in range(4)]
    assert {len(s) for s in shares} == {3}
    assert sorted(set(i for s in shares for i in s)) == list(range(10))


def test_metrics_match_independent_formulas():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    p[:120] = y[:120]  # correlated, not perfect
    tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
    fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert split_metrics("cola", p, y)["matthews_correlation"] == pytest.approx(mcc)
    m = split_metrics("mrpc", p, y)
    assert m["f1"] == pytest.approx(f1) and m["accuracy"] == pytest.approx(np.mean(p == y))
    gold = rng.uniform(0, 5, 50)
    pred = gold + rng.normal(0, 1, 50)
    ranks = lambda v: np.argsort(np.argsort(v))  # no ties in continuous draws
    m = split_metrics("stsb", pred, gold)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    assert m["spearman"] == pytest.approx(np.corrcoef(ranks(pred), ranks(gold))[0, 1])
    assert task_score("stsb", m) == pytest.approx(50 * (m["pearson"] + m["spearman"]))


def test_glue_score_is_the_mean_of_nine_task_scores():
    scores = {task: float(i) for i, task in enumerate(TASK_SCORE)}
    assert glue_score(scores) == pytest.approx(4.0)
    assert glue_score({"cola": 50.0}) is None


def finetune(model_dir, data_dir, out, *args):
    cmd = ssmforge("finetune-glue", model_dir, "--data-dir", data_dir, "--out", out,
                   "--config", ROOT / "configs" / "tiny.yaml", *args)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_finetune_learns_a_separable_task_and_writes_submissions(byte_model_dir, tmp_path):
    write_glue(tmp_path / "glue", ["sst2", "stsb"], n_train=384, n_dev=64, n_test=10)
    proc = finetune(byte_model_dir, tmp_path / "glue", tmp_path / "out", "--task", "sst2", "glue.lr=1e-2",
                    "glue.batch_size=16", "glue.epochs=4", "glue.max_length=48")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["sst2"]
    assert result["dev"]["accuracy"] >= 0.9, result  # chance is 0.5
    assert result["degenerate"] is False and result["constant_prediction"] is None  # learned: not flagged
    assert "DEGENERATE" not in proc.stdout and "learned nothing" not in proc.stderr
    assert result["score"] == max(e["score"] for e in result["epochs"])  # the best epoch is kept
    rows = (tmp_path / "out" / "submission" / "SST-2.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 11 and {r.split("\t")[1] for r in rows[1:]} <= {"0", "1"}
    assert "| sst2 |" in proc.stdout


@pytest.mark.slow
def test_all_tasks_end_to_end_give_the_glue_score(byte_model_dir, tmp_path):
    write_glue(tmp_path / "glue")
    proc = finetune(byte_model_dir, tmp_path / "glue", tmp_path / "out", "--task", "all", "glue.epochs=1",
                    "glue.batch_size=8", "glue.max_length=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(summary["tasks"]) == set(TASKS)
    for name, r in summary["tasks"].items():
        assert r["score"] == pytest.approx(task_score(name, r["dev"]))
    assert summary["score"] == pytest.approx(np.mean([r["score"] for r in summary["tasks"].values()]))
    assert {p.stem for p in (tmp_path / "out" / "submission").iterdir()} == SERVER_FILES  # AX from the MNLI model
    assert set(validate_submission(tmp_path / "out" / "submission", tmp_path / "glue", complete=True)) == SERVER_FILES
    ax = (tmp_path / "out" / "submission" / "AX.tsv").read_text().splitlines()
    assert ax[0] == "index\tprediction" and len(ax) == 8 and {r.split("\t")[1] for r in ax[1:]} <= set(LABELS["mnli"])
    mnli = (tmp_path / "out" / "submission" / "MNLI-mm.tsv").read_text().splitlines()[1:]
    assert len(mnli) == 6 and {r.split("\t")[1] for r in mnli} <= set(LABELS["mnli"])
    stsb = [float(r.split("\t")[1]) for r in (tmp_path / "out" / "submission" / "STS-B.tsv").read_text().splitlines()[1:]]
    assert all(0 <= v <= 5 for v in stsb)


@pytest.mark.parametrize("args,message", [
    (["--task", "glu"], "unknown GLUE task 'glu'"),
    (["--task", "rte", "glue.lr=-1"], "glue.lr"),
])
def test_finetune_usage_errors_are_one_line(byte_model_dir, tmp_path, args, message):
    write_glue(tmp_path / "glue", ["rte"], 4, 4, 2)
    proc = finetune(byte_model_dir, tmp_path / "glue", tmp_path / "out", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_finetune_missing_split_is_one_line(byte_model_dir, tmp_path):
    write_glue(tmp_path / "glue", ["rte"], 4, 4, 2)
    (tmp_path / "glue" / "RTE" / "train.tsv").unlink()
    proc = finetune(byte_model_dir, tmp_path / "glue", tmp_path / "out", "--task", "rte")
    assert proc.returncode == 2 and "RTE/train.tsv: missing rte train split" in proc.stderr, proc.stderr


# ---- degenerate fine-tunes: constant dev predictions are flagged, learned ones are not

def test_one_class_predictions_are_flagged_with_the_majority_baseline():
    labels = [1] * 6 + [0] * 2
    record = constant_prediction("sst2", [1] * 8, labels, LABELS["sst2"])
    assert record["kind"] == "constant_prediction" and record["predicted_class"] == "1"
    assert record["majority_class"] == "1" and record["accuracy"] == record["majority_accuracy"] == 0.75
    minority = constant_prediction("mrpc", [0] * 8, labels, LABELS["mrpc"])
    assert minority["predicted_class"] == "0" and minority["accuracy"] == 0.25
    assert minority["majority_accuracy"] == 0.75 and minority["majority_baseline"]["f1"] == pytest.approx(6 / 7)
    nli = constant_prediction("mnli", [2, 2, 2], [0, 2, 2], LABELS["mnli"])
    assert nli["predicted_class"] == nli["majority_class"] == "contradiction"
    # a learned classifier (mostly right, both classes predicted) is not flagged, even a poor one
    assert constant_prediction("sst2", [1, 1, 1, 1, 1, 0, 0, 1], labels, LABELS["sst2"]) is None
    assert constant_prediction("cola", [0, 1, 0, 1, 0, 1, 0, 1], labels, LABELS["cola"]) is None


def test_a_near_constant_regression_is_flagged_and_a_learned_one_is_not():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 64)
    flat = 2.5 + 1e-4 * rng.normal(size=64) + 1e-4 * gold  # correlated with the labels, but nothing learned
    record = constant_prediction("stsb", flat, gold)
    assert record["kind"] == "near_constant" and record["std_ratio"] < 0.01
    assert record["prediction_mean"] == pytest.approx(2.5, abs=1e-3)
    assert constant_prediction("stsb", gold + rng.normal(0, 0.5, 64), gold) is None


def _result(task, constant_predictions: bool, labels):
    predictions = [1] * len(labels) if constant_predictions else labels
    dev = split_metrics(task, predictions, labels)
    record = constant_prediction(task, predictions, labels, LABELS[task])
    return TaskResult(task, 1, dev, task_score(task, dev), constant={"dev": record} if record else {},
                      majority={"dev": 0.75})


def test_results_json_and_table_mark_a_degenerate_task(tmp_path):
    labels = [1] * 6 + [0] * 2
    weak = [1, 1, 1, 1, 0, 0, 0, 1]  # varied predictions, accuracy 0.5 below the baseline 0.75
    results = [_result("sst2", True, labels), _result("rte", False, labels), _result("wnli", False, weak)]
    results[2].dev = split_metrics("wnli", weak, labels)
    summary = write_results(results, TASKS, tmp_path, "ckpt")
    saved = json.loads((tmp_path / "results.json").read_text())["tasks"]
    assert saved == summary["tasks"]
    sst2, rte = saved["sst2"], saved["rte"]
    assert sst2["degenerate"] is True and rte["degenerate"] is False and rte["constant_prediction"] is None
    record = sst2["constant_prediction"]["dev"]
    assert record["predicted_class"] == "1" and record["majority_accuracy"] == 0.75
    table = (tmp_path / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| sst2 |"))
    assert "DEGENERATE" in row and "all one class ('1'" in row and "equals the majority baseline" in row
    assert next(line for line in table.splitlines() if line.startswith("| rte |")).endswith("| 1 |  |")
    wnli = next(line for line in table.splitlines() if line.startswith("| wnli |"))
    assert "DEGENERATE" not in wnli and "accuracy at or below the majority baseline 75.00" in wnli
    assert saved["wnli"]["majority_baseline"] == {"dev": 0.75} and saved["wnli"]["degenerate"] is False
    assert "Degenerate fine-tunes" in table and ": sst2." in table


# ---- the submission folder: what the GLUE server accepts

def _write_submission(folder, root, written):
    """A valid prediction for every row of every test file of the fixture, as the server wants it."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (task, split) in SUBMISSION_FILES.items():
        key = (task.name, split)
        value = "2.500" if task.is_regression else task.labels[-1]
        rows = "".join(f"{r[0]}\t{value}\n" for r in written[key])
        (folder / f"{stem}.tsv").write_text("index\tprediction\n" + rows)


def test_a_complete_submission_validates(glue_dir, tmp_path):
    root, written = glue_dir
    _write_submission(tmp_path / "sub", root, written)
    assert set(validate_submission(tmp_path / "sub", root, complete=True)) == SERVER_FILES
    assert set(SUBMISSION_FILES) == SERVER_FILES


@pytest.mark.parametrize("break_it,message", [
    (lambda d: (d / "SST-2.tsv").rename(d / "SST2.tsv"), r"SST2.tsv: not a file the GLUE server accepts"),
    (lambda d: (d / "AX.tsv").unlink(), r"incomplete GLUE submission, missing AX.tsv"),
    (lambda d: _edit(d / "RTE.tsv", 0, "id\tlabel"), r"RTE.tsv:1: header 'id\\tlabel'"),
    (lambda d: _edit(d / "QNLI.tsv", 2, None), r"QNLI.tsv: 5 predictions, the test file .*QNLI/test.tsv has 6"),
    (lambda d: _edit(d / "MNLI-mm.tsv", 3, "2\tentails"), r"MNLI-mm.tsv:4: prediction 'entails' is not one of "
                                                         r"entailment, neutral, contradiction"),
    (lambda d: _edit(d / "AX.tsv", 1, "0\tnot_entailment"), r"AX.tsv:2: prediction 'not_entailment'"),
    (lambda d: _edit(d / "STS-B.tsv", 2, "1\t5.5"), r"STS-B.tsv:3: prediction '5.5' is not a number in \[0, 5\]"),
    (lambda d: _edit(d / "CoLA.tsv", 1, "0\t2"), r"CoLA.tsv:2: prediction '2' is not one of 0, 1"),
    (lambda d: _edit(d / "RTE.tsv", 1, "0\t1"), r"RTE.tsv:2: prediction '1' is not one of entailment, not_entailment"),
    (lambda d: _edit(d / "WNLI.tsv", 1, "0\tentailment"), r"WNLI.tsv:2: prediction 'entailment' is not one of 0, 1"),
    (lambda d: _edit(d / "MRPC.tsv", 1, "5\t1"), r"MRPC.tsv:2: index '5', the test file .* has '0' there"),
    (lambda d: _edit(d / "QQP.tsv", 1, "0 1"), r"QQP.tsv:2: 1 columns, expected 2"),
])
def test_a_broken_submission_fails_with_one_line_naming_the_file(glue_dir, tmp_path, break_it, message):
    root, written = glue_dir
    folder = tmp_path / "sub"
    _write_submission(folder, root, written)
    break_it(folder)
    with pytest.raises(DataError, match=message) as error:
        validate_submission(folder, root, complete=True)
    assert "\n" not in str(error.value)


def _edit(path, line, text):
    lines = path.read_text().splitlines()
    if text is None:
        del lines[line]
    else:
        lines[line] = text
    path.write_text("\n".join(lines) + "\n")


def test_finetune_flags_a_model_forced_to_predict_one_class(byte_model_dir, tmp_path):
    """Every dev sentence is the same, so any model predicts one class (and one STS-B score) for all of
    them: the run must say so in results.json, the table and a WARNING, not report the baseline as learned."""
    write_glue(tmp_path / "glue", ["sst2", "stsb"], n_train=16, n_dev=8, n_test=4)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"the film was long\t{label}\n" for label in "11111100"))
    stsb = (tmp_path / "glue" / "STS-B" / "dev.tsv").read_text().splitlines()
    same = lambda row: "\t".join(row.split("\t")[:7] + ["a man is here", "a dog is there", row.split("\t")[-1]])
    (tmp_path / "glue" / "STS-B" / "dev.tsv").write_text("\n".join([stsb[0]] + [same(r) for r in stsb[1:]]) + "\n")
    proc = finetune(byte_model_dir, tmp_path / "glue", tmp_path / "out", "--task", "sst2", "glue.epochs=1",
                    "glue.batch_size=8", "glue.max_length=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]["sst2"]
    record = result["constant_prediction"]["dev"]
    assert result["degenerate"] is True and result["epochs"][0]["degenerate"] is True
    assert record["majority_class"] == "1" and record["majority_accuracy"] == 0.75
    assert record["accuracy"] in (0.25, 0.75) and record["predicted_class"] in ("0", "1")
    assert "DEGENERATE" in proc.stdout and "all one class" in proc.stdout
    assert "WARNING" in proc.stderr and "learned nothing" in proc.stderr and "all one class" in proc.stderr
    proc = finetune(byte_model_dir, tmp_path / "glue", tmp_path / "out_stsb", "--task", "stsb", "glue.epochs=1",
                    "glue.batch_size=8", "glue.max_length=32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out_stsb" / "results.json").read_text())["tasks"]["stsb"]
    assert result["degenerate"] is True and result["constant_prediction"]["dev"]["kind"] == "near_constant"
    assert "near-constant prediction" in proc.stdout


def test_finetune_fails_in_one_line_on_a_submission_folder_the_server_would_refuse(byte_model_dir, tmp_path):
    write_glue(tmp_path / "glue", ["rte"], 8, 4, 2)
    (tmp_path / "out" / "submission").mkdir(parents=True)
    (tmp_path / "out" / "submission" / "RTE-test.tsv").write_text("index\tprediction\n0\tentailment\n")
    proc = finetune(byte_model_dir, tmp_path / "glue", tmp_path / "out", "--task", "rte", "glue.epochs=1",
                    "glue.batch_size=4", "glue.max_length=32")
    # after the fine-tune (whose libraries may log to stderr) the last line is the one error line
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "RTE-test.tsv: not a file the GLUE server accepts" in error, proc.stderr
    assert error.startswith("ssmforge: error: ")
    assert (tmp_path / "out" / "results.json").is_file()  # the results themselves were written first
