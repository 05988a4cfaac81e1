"""Fail before working (ssmforge.data_pipeline.preflight): `ssmforge prepare` and `ssmforge pretrain` refuse a bad
input or output with one line and exit code 2 before torch, DeepSpeed, streaming, datasets or SentencePiece load,
on every rank alike, and leave nothing behind: no run folder, no `.lock`, no shard folder."""
import os
import sys

import pytest

from ..test_startup import cli_imports
from .conftest import ROOT, start_ranks

TINY = "configs/tiny.yaml"


def local(*paths) -> str:
    return f"data.sources=[{{kind: local, paths: [{', '.join(map(str, paths))}]}}]"


def refused(*args) -> str:
    """Run the command in a process that reports the heavy modules it loaded; it must end with exit code 2 and one
    line, having loaded none of them. Returns the line."""
    result, stderr = cli_imports(*map(str, args))
    assert result == {"code": 2, "heavy": []}, stderr[-3000:]
    (line,) = stderr.strip().splitlines()
    return line


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("a document\n")
    return path


@pytest.mark.parametrize("command", ["pretrain", "prepare"])
@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_a_misspelt_source_path_is_refused_at_once(tmp_path, command, tokenizer):
    run = tmp_path / "run"
    line = refused(command, TINY, f"run_dir={run}", f"tokenizer.kind={tokenizer}", "model.vocab_size=8192",
                   local("/nonexistent/*.txt"))
    assert line == "ssmforge: error: data.sources.0.paths: /nonexistent/*.txt: no such file (or the glob matches nothing)"
    assert not run.exists()  # no run folder, no .lock, no data/


@pytest.mark.parametrize("command", ["pretrain", "prepare"])
def test_the_second_source_and_its_second_pattern_are_checked_too(tmp_path, text_file, command):
    run = tmp_path / "run"
    sources = f"data.sources=[{{kind: synthetic, max_documents: 10}}, {{kind: local, paths: [{text_file}, {tmp_path}/x*.jsonl]}}]"
    line = refused(command, TINY, f"run_dir={run}", sources)
    assert line == f"ssmforge: error: data.sources.1.paths: {tmp_path}/x*.jsonl: no such file (or the glob matches nothing)"
    assert not run.exists()


@pytest.mark.parametrize("command", ["pretrain", "prepare"])
@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_a_missing_tokenizer_file_is_refused_at_once(tmp_path, text_file, command, kind):
    run = tmp_path / "run"
    line = refused(command, TINY, f"run_dir={run}", f"tokenizer.kind={kind}", "tokenizer.path=/nonexistent/tok.model",
                   local(text_file))
    assert line == "ssmforge: error: tokenizer.path=/nonexistent/tok.model: no such file"
    assert not run.exists()


@pytest.mark.parametrize("command", ["pretrain", "prepare"])
def test_an_unwritable_run_dir_is_refused_at_once(tmp_path, text_file, command):
    """A path under a regular file cannot be created, for root too (where permissions would not stop it)."""
    run = text_file / "run"
    line = refused(command, TINY, f"run_dir={run}", local(text_file))
    key = "run_dir" if command == "pretrain" else "data.shard_dir"  # prepare writes only the shard folder
    where = run if command == "pretrain" else run / "data"
    assert line == f"ssmforge: error: {key}={where} cannot be created: {text_file} is not a folder"
    assert text_file.read_text() == "a document\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000, so the check (os.access) rightly lets "
                                              "it pass; tests/data_pipeline/test_preflight.py covers the refusal")
@pytest.mark.parametrize("command", ["pretrain", "prepare"])
def test_an_unreadable_source_file_is_refused_at_once(tmp_path, text_file, command):
    run = tmp_path / "run"
    text_file.chmod(0)
    try:
        line = refused(command, TINY, f"run_dir={run}", local(text_file))
    finally:
        text_file.chmod(0o644)
    assert line == f"ssmforge: error: data.sources.0.paths: {text_file}: not readable (permission denied)"
    assert not run.exists()


def test_a_hub_source_is_not_looked_up(tmp_path):
    """No network is needed to refuse what is wrong elsewhere: a hub source is never checked for reachability."""
    run = tmp_path / "run"
    line = refused("prepare", TINY, f"run_dir={run}", "data.sources=[{kind: hub, name: no/such-dataset}, "
                   "{kind: local, paths: [/nonexistent.jsonl]}]")
    assert line == "ssmforge: error: data.sources.1.paths: /nonexistent.jsonl: no such file (or the glob matches nothing)"
    assert not run.exists()


def test_every_rank_refuses_alike(tmp_path):
    """Two ranks under a launcher's variables: each checks the same config and stops with the same line, before
    the process group (which would wait for the other) and before anything is written."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "ssmforge", "pretrain", str(ROOT / TINY), f"run_dir={run}",
               local("/nonexistent/*.txt")]
    procs = start_ranks(command, 2)
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    assert [err.strip() for _, err in outputs] == ["ssmforge: error: data.sources.0.paths: /nonexistent/*.txt: no such "
                                                   "file (or the glob matches nothing)"] * 2
    assert not run.exists()

