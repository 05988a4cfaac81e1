import json
import math
import subprocess

import numpy as np
import pytest

from ssmforge.data_pipeline.tokenizer import ByteTokenizer
from ssmforge.evaluation.glue import encode_example, rank_indices
from ssmforge.evaluation.glue_metrics import TASK_SCORE, glue_score, split_metrics, task_score
from ssmforge.evaluation.glue_tasks import TASKS, Example, get_task, read_tsv
from ssmforge.errors import ConfigError, DataError

from .conftest import ROOT, ssmforge
from .glue_fixture import LABELS, write_glue


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
    stems = {"MNLI-m", "MNLI-mm", "CoLA", "SST-2", "MRPC", "QQP", "STS-B", "QNLI", "RTE", "WNLI"}
    assert {p.stem for p in (tmp_path / "out" / "submission").iterdir()} == stems
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
