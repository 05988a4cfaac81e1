"""Every stage stands on its own: an export carries what eval-ppl and finetune-glue read from a run
(ssmforge_run.yaml: the training seq_len, the eval and glue settings, train and deepspeed), so that the
stages work on a run folder, an export or a Hugging Face folder without extra flags; and bad input to
them is one line, exit code 2, before torch loads and before anything is written."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ssmforge.evaluation.glue_tasks import TASKS
from ssmforge.models.hf import CONFIG_FILE
from ssmforge.pretrain import export
from ssmforge.pretrain.config import GlueConfig, load_config

from ..models.test_folder_modes import modes, restore_umask  # noqa: F401 (a fixture)
from ..pretrain.conftest import run_pretrain
from ..test_startup import cli_imports
from .conftest import ROOT, ssmforge
from .glue_fixture import write_glue

SEQ_LEN = 32  # the run trains at 32 tokens: eval-ppl's default window on its export, not 2048
RUN_SETTINGS = (f"data.seq_len={SEQ_LEN}", "eval.batch_size=4", "glue.epochs=1", "glue.batch_size=8",
                "glue.max_length=40", "glue.lr=1e-3", "glue.seed=7")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder trained for two steps with its own eval and glue settings, and its export (written
    under umask 022)."""
    root = tmp_path_factory.mktemp("standalone")
    run_pretrain(root / "run", "data.sources=[{kind: synthetic, max_documents: 60}]", "train.max_steps=2",
                 "train.log_every=1", "train.eval_every=100", "train.save_every=100", *RUN_SETTINGS)
    old = os.umask(0o022)
    try:
        proc = subprocess.run(ssmforge("export", root / "run", root / "export"), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", root / "export"


def run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(ssmforge(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_export_carries_the_run_settings_in_a_readable_folder(tiny_run):
    run_dir, out = tiny_run
    assert modes(out) == {"export": 0o755, "config.json": 0o644, "model.safetensors": 0o644,
                          export.RUN_FILE: 0o644}
    text = (out / export.RUN_FILE).read_text()
    assert text.startswith("# The settings of the run this model was exported from")
    assert f"# Source: {run_dir.resolve()}, checkpoint step_00000002\n" in text
    saved = yaml.safe_load(text)
    assert "slurm" not in saved and "wandb" not in saved  # the cluster account and wandb team stay behind
    ours, theirs = load_config(out / export.RUN_FILE, frozen=True), load_config(run_dir / "config.yaml", frozen=True)
    assert ours.data.seq_len == SEQ_LEN and (ours.glue.epochs, ours.glue.max_length, ours.eval.batch_size) == (1, 40, 4)
    for section in ("data", "eval", "glue", "train", "deepspeed", "model", "tokenizer"):
        assert getattr(ours, section) == getattr(theirs, section), section
    hf = json.loads((out / CONFIG_FILE).read_text())  # config.json keeps only transformers' and our model fields
    assert not {"data", "eval", "glue", "train", "deepspeed"} & set(hf) and hf["model_type"] == "mamba"
    assert export.CONFIG_FILE == CONFIG_FILE


def test_export_loads_in_transformers(tiny_run):
    transformers = pytest.importorskip("transformers")
    _, info = transformers.MambaForCausalLM.from_pretrained(tiny_run[1], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def ppl(source, text, out, *args) -> dict:
    proc = run("eval-ppl", source, "--dataset", text, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return result


def test_eval_ppl_windows_default_to_the_training_length(tiny_run, byte_model_dir, tmp_path):
    run_dir, out = tiny_run
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran after it; " * 4 + "\n")
    converted = tmp_path / "converted"  # convert --to-hf takes the settings along
    assert run("convert", out, "--to-hf", converted).returncode == 0
    results = {name: ppl(source, text, tmp_path / f"ppl-{name}")
               for name, source in (("run", run_dir), ("export", out), ("converted", converted))}
    for name, result in results.items():
        assert (result["max_length"], result["stride"]) == (SEQ_LEN, SEQ_LEN), name
        assert result["nll"] == pytest.approx(results["run"]["nll"], rel=1e-6), name
    assert (tmp_path / "ppl-export" / f"ppl-text.txt-L{SEQ_LEN}-S{SEQ_LEN}.json").is_file()
    # a flag wins; a Hugging Face folder (no run settings) keeps the 2048 default
    assert ppl(out, text, tmp_path / "flag", "--max-length", 16)["max_length"] == 16
    assert ppl(byte_model_dir, text, tmp_path / "hf")["max_length"] == 2048


def test_an_eos_trained_run_is_scored_after_eos_not_bos(tiny_run, tmp_path):
    """The run's manifest records that packing put EOS before every document; eval-ppl on the run folder
    and on its export reads each document after EOS, exactly (a BOS-prefixed score would differ)."""
    import torch
    import torch.nn.functional as F

    from ssmforge.pretrain.export import load_model_and_tokenizer

    run_dir, out = tiny_run
    shard_dir = load_config(run_dir / "config.yaml", frozen=True).data.shard_dir
    assert json.loads((Path(shard_dir) / "manifest.json").read_text())["tokenizer"]["document_prefix"] == "eos"
    text = tmp_path / "t.txt"
    text.write_text("The cat sat.\n")
    model, tok, _ = load_model_and_tokenizer(run_dir)
    ids = tok.encode(text.read_text())
    assert 0 < len(ids) <= SEQ_LEN and tok.bos_id != tok.eos_id

    def nll_after(prefix: int) -> float:
        with torch.no_grad():
            logits = model.eval()(torch.tensor([[prefix] + ids[:-1]]))[0]
        return F.cross_entropy(logits, torch.tensor(ids), reduction="sum").item()

    after_eos, after_bos = nll_after(tok.eos_id), nll_after(tok.bos_id)
    assert abs(after_eos - after_bos) > 1e-3
    for name, source in (("run", run_dir), ("export", out)):
        result = ppl(source, text, tmp_path / name)
        assert result["document_prefix"] == "eos", name
        assert result["nll"] == pytest.approx(after_eos, rel=1e-5), name
    # the flag overrides the manifest
    assert ppl(run_dir, text, tmp_path / "bos", "--document-prefix", "bos")["nll"] == pytest.approx(after_bos, rel=1e-5)


def glue(source, data, out, *args) -> dict:
    proc = run("finetune-glue", source, "--task", "sst2", "--data-dir", data, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())["tasks"]["sst2"]


@pytest.mark.slow
def test_finetune_glue_on_an_export_needs_no_config_and_equals_the_run_folder(tiny_run, byte_model_dir, tmp_path):
    run_dir, out = tiny_run
    write_glue(tmp_path / "glue", ["sst2"], n_train=16, n_dev=8, n_test=4)
    from_export = glue(out, tmp_path / "glue", tmp_path / "export")
    from_run = glue(run_dir, tmp_path / "glue", tmp_path / "run")
    assert len(from_export["epochs"]) == 1  # glue.epochs=1 of the run, not the default 3
    # the same weights and settings: the same result, up to float summation order in the training loss
    for epoch in from_export["epochs"]:
        epoch["train_loss"] = pytest.approx(epoch["train_loss"], abs=1e-6)
    assert from_export == from_run
    # a Hugging Face folder without settings runs on the defaults and the overrides
    assert len(glue(byte_model_dir, tmp_path / "glue", tmp_path / "hf", "glue.epochs=1", "glue.batch_size=8",
                    "glue.max_length=32")["epochs"]) == 1


def test_settings_come_from_the_flag_else_the_checkpoint_else_the_defaults(tiny_run, byte_model_dir):
    run_dir, out = tiny_run
    assert export.run_settings(run_dir).data.seq_len == export.run_settings(out).data.seq_len == SEQ_LEN
    assert export.run_settings(out, ["glue.epochs=2"]).glue.epochs == 2  # overrides win
    tiny = export.run_settings(out, ["glue.epochs=2"], ROOT / "configs" / "tiny.yaml")  # so does --config
    assert (tiny.data.seq_len, tiny.glue.epochs) == (64, 2)
    assert export.run_settings(byte_model_dir) is None  # eval-ppl: no settings, its own defaults
    defaults = export.run_settings(byte_model_dir, defaults=True)
    assert defaults.glue == GlueConfig() and defaults.run_dir == str(byte_model_dir)


def refused(*args) -> str:
    """stderr of a command that must fail with exit code 2, one line, before torch or datasets load."""
    result, stderr = cli_imports(*map(str, args))
    assert result["code"] == 2, stderr[-3000:]
    assert result["heavy"] == [], f"{args} imported {result['heavy']}"
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


EXPECTED = "a run folder or a model folder"


@pytest.mark.parametrize("command", [["eval-ppl"], ["finetune-glue", "--task", "sst2"], ["generate", "--prompt", "a"],
                                     ["convert", "--from-hf"]])
def test_a_missing_or_wrong_checkpoint_folder_is_one_line(tmp_path, command):
    missing, empty, file = tmp_path / "missing", tmp_path / "empty", tmp_path / "file"
    empty.mkdir()
    file.write_text("x")
    out = ["--out", tmp_path / "out"] if command[0] != "generate" else []
    for folder, message in ((missing, f"{missing}: not found (expected {EXPECTED})"),
                            (file, f"{file}: not a folder (expected {EXPECTED})"),
                            (empty, f"{empty}/config.json: file not found (expected a model folder, or a run "
                                    f"folder with config.yaml and checkpoints/)")):
        args = [command[0], folder, *command[1:]] if command[0] != "convert" else [*command, folder]
        assert refused(*args, *out) == f"ssmforge: error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]  # nothing written


def test_a_run_folder_without_a_checkpoint_is_one_line(tmp_path, byte_model_dir):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"run_dir: {run_dir}\n")
    assert refused("eval-ppl", run_dir) == f"ssmforge: error: {run_dir}/checkpoints: no checkpoint to load (no " \
                                           f"'latest' yet)"
    assert refused("export", run_dir, tmp_path / "out") == refused("eval-ppl", run_dir)
    assert refused("export", run_dir, tmp_path / "out", "--tag", "step_1") == \
        f"ssmforge: error: {run_dir}/checkpoints: no checkpoint named step_1"
    (run_dir / "checkpoints").rmdir()
    assert refused("finetune-glue", run_dir, "--task", "rte") == \
        f"ssmforge: error: {run_dir}: the run has no checkpoints/ yet (nothing to load)"
    assert refused("export", tmp_path / "nope", tmp_path / "out") == \
        f"ssmforge: error: {tmp_path / 'nope'}: not found (expected a run folder with config.yaml and checkpoints/)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_never_replaces_a_folder_that_is_not_a_model(tiny_run, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert refused("export", tiny_run[0], other) == (f"ssmforge: error: {other}: exists and is not a model folder "
                                                     f"(no config.json); give a new or empty folder for the export")
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_checkpoint_is_one_line(tmp_path, byte_model_dir):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(byte_model_dir, folder)
    os.chmod(folder, 0)
    try:
        assert refused("eval-ppl", folder) == f"ssmforge: error: {folder}: cannot read the folder (Permission denied)"
    finally:
        os.chmod(folder, 0o755)


def test_an_unknown_task_is_said_first(tmp_path):
    # the checkpoint and the data folder are missing too: the task is what is wrong first
    assert refused("finetune-glue", tmp_path / "missing", "--task", "sst3", "--data-dir", tmp_path / "nope") == \
        f"ssmforge: error: unknown GLUE task 'sst3': one of {', '.join(TASKS)} or all"


def test_glue_data_folder_is_checked_before_any_work(byte_model_dir, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope"
    layout = ", ".join(t.folder + "/" for t in TASKS.values())
    assert refused("finetune-glue", byte_model_dir, "--task", "sst2", "--data-dir", missing, "--out", out) == \
        f"ssmforge: error: --data-dir {missing}: no such folder (expected the GLUE TSV layout: {layout})"
    assert refused("finetune-glue", byte_model_dir, "--task", "sst2", f"glue.data_dir={missing}", "--out", out) == \
        f"ssmforge: error: glue.data_dir {missing}: no such folder (expected the GLUE TSV layout: {layout})"
    data = tmp_path / "glue"
    write_glue(data, ["sst2", "mnli"], 4, 4, 2)
    (data / "SST-2" / "dev.tsv").unlink()
    (data / "MNLI" / "dev_mismatched.tsv").unlink()
    for task, file, split in (("sst2", "SST-2/dev.tsv", "dev"), ("mnli", "MNLI/dev_mismatched.tsv", "dev_mismatched"),
                              ("all", "CoLA/train.tsv", "train")):
        name = "cola" if task == "all" else task
        assert refused("finetune-glue", byte_model_dir, "--task", task, "--data-dir", data, "--out", out) == \
            f"ssmforge: error: {data / file}: missing {name} {split} split (expected the GLUE TSV layout {file} " \
            f"under glue.data_dir)"
    assert not out.exists()


def test_eval_ppl_dataset_matching_nothing_is_one_line(byte_model_dir, tmp_path):
    pattern = tmp_path / "nothing-*.txt"
    assert refused("eval-ppl", byte_model_dir, "--dataset", pattern, "--out", tmp_path / "out") == \
        f"ssmforge: error: --dataset {pattern}: no such file (or the glob matches nothing)"
    assert not (tmp_path / "out").exists() and not (byte_model_dir / "eval").exists()
