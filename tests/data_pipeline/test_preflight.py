"""preflight(config, command): every input and output that prepare and pretrain can check up front, with the
exact line each refusal prints; and a prepare that fails while it works leaves no half-written shard folder."""
import json
import os
from pathlib import Path

import pytest

from ssmforge.data_pipeline.pack import prepare, prepare_tokenizer, undone_on_error
from ssmforge.data_pipeline.parts import prepare_part
from ssmforge.data_pipeline.preflight import preflight
from ssmforge.errors import ConfigError, DataError

from .conftest import run_config, write_jsonl

NO_MATCH = "no such file (or the glob matches nothing)"


def refusal(config, command="prepare", step=None, error=DataError) -> str:
    with pytest.raises(error) as caught:
        preflight(config, command, step)
    return str(caught.value)


@pytest.mark.parametrize("command", ["prepare", "pretrain"])
def test_local_files_are_checked(tmp_path, corpus, command):
    path, _ = corpus
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "table.csv").write_text("a,b\n")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere")
    cases = {
        f"{tmp_path}/missing*.jsonl": f"{tmp_path}/missing*.jsonl: {NO_MATCH}",
        f"{tmp_path}/table.csv": f"{tmp_path}/table.csv: unsupported file type '.csv'; expected one of ('.jsonl', "
                                 f"'.json', '.parquet', '.txt')",
        f"{tmp_path}/empty.jsonl": f"{tmp_path}/empty.jsonl: file is empty",
        f"{tmp_path}/folder.jsonl": f"{tmp_path}/folder.jsonl: not a file",
        f"{tmp_path}/gone.jsonl": f"{tmp_path}/gone.jsonl: no such file",
    }
    for i, (pattern, message) in enumerate(cases.items()):
        config = run_config(tmp_path / str(i), [path, pattern])
        assert refusal(config, command) == f"data.sources.0.paths: {message}"
        assert not (tmp_path / str(i)).exists()
    preflight(run_config(tmp_path / "ok", [path, f"{tmp_path}/corpus*.jsonl"]), command)
    assert not (tmp_path / "ok").exists()  # checks only read


@pytest.mark.parametrize("command", ["prepare", "pretrain"])
def test_an_unreadable_file_is_refused(tmp_path, corpus, monkeypatch, command):
    """As root every file is readable, so the permission check is made to say no for one file here (the CLI test
    in tests/pretrain/test_preflight.py chmods a file where it does not run as root)."""
    path, _ = corpus
    deny(monkeypatch, path, os.R_OK)
    assert refusal(run_config(tmp_path, [path]), command) == f"data.sources.0.paths: {path}: not readable " \
                                                             f"(permission denied)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file of mode 000: os.access rightly lets it pass")
def test_a_file_of_mode_000_is_refused(tmp_path, corpus):
    path, _ = corpus
    path.chmod(0)
    try:
        assert refusal(run_config(tmp_path, [path])) == f"data.sources.0.paths: {path}: not readable (permission denied)"
    finally:
        path.chmod(0o644)


def test_the_tokenizer_file_is_checked(tmp_path, corpus):
    path, _ = corpus
    (tmp_path / "empty.model").write_bytes(b"")
    for kind in ("sentencepiece", "hf"):
        for file, problem in ((tmp_path / "none.model", "no such file"), (tmp_path / "empty.model", "file is empty"),
                              (tmp_path, "not a file")):
            config = run_config(tmp_path / "r", [path], f"tokenizer.kind={kind}", f"tokenizer.path={file}")
            for command in ("prepare", "pretrain"):
                assert refusal(config, command) == f"tokenizer.path={file}: {problem}"
    # the byte tokenizer reads no file: a path left over in the config does not matter
    preflight(run_config(tmp_path / "r", [path], "tokenizer.kind=byte", f"tokenizer.path={tmp_path}/none"), "prepare")


def test_the_vocabulary_is_checked_before_a_tokenizer_is_trained(tmp_path, corpus):
    path, _ = corpus
    config = run_config(tmp_path, [path], "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=1000")
    for command in ("prepare", "pretrain"):
        assert refusal(config, command, error=ConfigError) == (
            "tokenizer.vocab_size=1000 is larger than model.vocab_size=260: the SentencePiece model trained here has "
            "exactly tokenizer.vocab_size ids; set model.vocab_size=1000 or a smaller tokenizer.vocab_size")
    assert refusal(run_config(tmp_path, [path], "model.vocab_size=100", "model.pad_vocab_size_multiple=1")) == (
        "the tokenizer has 260 ids but model.vocab_size is 100; set model.vocab_size=260")


def test_output_folders_must_be_writable(tmp_path, corpus):
    path, _ = corpus
    file = tmp_path / "file"
    file.write_text("x")
    assert refusal(run_config(file, [path]), "pretrain", error=ConfigError) == \
        f"run_dir={file}/run cannot be created: {file} is not a folder"
    assert refusal(run_config(tmp_path, [path], f"run_dir={file}"), "pretrain", error=ConfigError) == \
        f"run_dir={file} is not a folder"
    assert refusal(run_config(tmp_path, [path], f"data.shard_dir={file}/data")) == \
        f"data.shard_dir={file}/data cannot be created: {file} is not a folder"
    assert refusal(run_config(tmp_path, [path], f"data.shard_dir={file}")) == f"data.shard_dir={file} is not a folder"
    remote = ["data.shard_dir=s3://bucket/data", f"data.cache_dir={file}/cache"]
    for command in ("prepare", "pretrain"):  # remote shards are staged (prepare) and cached (pretrain) there
        assert refusal(run_config(tmp_path, [path], *remote), command) == \
            f"data.cache_dir={file}/cache cannot be created: {file} is not a folder"


def deny(monkeypatch, path: Path, mode: int) -> None:
    """os.access says no to `mode` on `path`: what permissions do for anyone but root, which the tests run as."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: access(p, m) and not (Path(p) == path and m & mode))


def test_permissions_of_output_folders(tmp_path, corpus, monkeypatch):
    path, _ = corpus
    locked = tmp_path / "locked"
    locked.mkdir()
    deny(monkeypatch, locked, os.W_OK)
    assert refusal(run_config(locked, [path]), "pretrain", error=ConfigError) == \
        f"run_dir={locked}/run cannot be created: {locked} is not writable (permission denied)"
    assert refusal(run_config(tmp_path, [path], f"run_dir={locked}"), "pretrain", error=ConfigError) == \
        f"run_dir={locked} is not writable (permission denied)"
    for command in ("prepare", "pretrain"):
        assert refusal(run_config(tmp_path, [path], f"data.shard_dir={locked}"), command) == \
            f"data.shard_dir={locked} is not writable (permission denied)"
    deny(monkeypatch, locked, os.R_OK)
    for command in ("prepare", "pretrain"):
        assert refusal(run_config(tmp_path, [path], f"data.shard_dir={locked}"), command) == \
            f"data.shard_dir={locked} is not readable (permission denied)"


def test_the_shard_folder(tmp_path, corpus):
    path, _ = corpus
    config = run_config(tmp_path, [path])
    shards = Path(config.data.shard_dir)
    shards.mkdir(parents=True)
    (shards / "notes.txt").write_text("mine")
    for command in ("prepare", "pretrain"):
        assert refusal(config, command) == f"{shards}: folder is not empty and holds no ssmforge manifest; refusing " \
                                           f"to write into it"
    (shards / "notes.txt").unlink()
    prepare(config)
    assert "already holds data prepared from a different config" in refusal(
        run_config(tmp_path, [path], "data.seq_len=16"), "pretrain")
    # prepared: neither the sources nor a tokenizer file are needed any more
    path.rename(tmp_path / "moved.jsonl")
    for command in ("prepare", "pretrain"):
        preflight(config, command)
    manifest = shards / "manifest.json"
    record = json.loads(manifest.read_text())
    record["tokenizer"]["vocab_size"] = 300  # as if the shards held ids the model has no row for
    manifest.write_text(json.dumps(record))
    assert refusal(config, "pretrain", error=ConfigError).startswith("model.vocab_size=260 is smaller than the "
                                                                     "tokenizer of these shards")


def test_prepared_shards_must_be_readable_and_decompressible(tmp_path, corpus, monkeypatch):
    """Training reads each split's index and writes a shard's decompressed copy beside it on first use."""
    path, _ = corpus
    config = run_config(tmp_path, [path])
    prepare(config)
    shards = Path(config.data.shard_dir)
    deny(monkeypatch, shards / "train", os.W_OK)
    assert refusal(config, "pretrain") == (f"data.shard_dir={shards}: {shards}/train is not writable (permission "
                                           f"denied), and training writes each shard's decompressed copy there")
    preflight(config, "prepare")  # prepared: nothing to write
    deny(monkeypatch, shards / "manifest.json", os.R_OK)
    for command in ("prepare", "pretrain"):
        assert refusal(config, command) == f"data.shard_dir={shards}: {shards}/manifest.json is not readable " \
                                           f"(permission denied)"
    monkeypatch.undo()
    (shards / "val" / "index.json").unlink()
    assert refusal(config, "pretrain") == f"data.shard_dir={shards}: {shards}/val/index.json is missing; prepare " \
                                          f"the data again"


def test_what_each_step_of_a_prepare_in_parts_needs(tmp_path, corpus):
    path, _ = corpus
    spm = ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300", "model.vocab_size=300"]
    config = run_config(tmp_path, [path], *spm)
    shards = Path(config.data.shard_dir)
    assert refusal(config, step="part") == (f"{shards}: no trained tokenizer for this config; the parts of a prepare "
                                            f"share one, trained once before them: run `ssmforge prepare CONFIG "
                                            f"--train-tokenizer` first")
    preflight(config, "prepare", "tokenizer")
    missing = run_config(tmp_path, [tmp_path / "nothing.jsonl"], *spm)
    assert refusal(missing, step="tokenizer") == f"data.sources.0.paths: {tmp_path}/nothing.jsonl: {NO_MATCH}"
    preflight(missing, "prepare", "merge")  # the parts are merged from the shard folder: the sources are not read
    byte = run_config(tmp_path, [tmp_path / "nothing.jsonl"])
    preflight(byte, "prepare", "tokenizer")  # nothing to train
    assert refusal(byte, step="part") == f"data.sources.0.paths: {tmp_path}/nothing.jsonl: {NO_MATCH}"
    assert not shards.exists()


def test_a_prepare_that_fails_while_it_works_leaves_no_shards(tmp_path, corpus):
    """What only reading the data shows (here invalid UTF-8 in the last document) fails the prepare: its
    half-written shards go, and so does the shard folder (and the run folder) it created."""
    path, _ = corpus
    with open(path, "ab") as f:
        f.write(b'{"text": "bad \xff"}\n')
    config = run_config(tmp_path, [path])
    preflight(config, "prepare")  # nothing to see up front
    with pytest.raises(DataError, match=r"corpus\.jsonl:401: invalid UTF-8"):
        prepare(config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match=r"corpus\.jsonl:401: invalid UTF-8"):
        prepare_part(config, 1, 2)
    assert not (tmp_path / "run").exists()
    # a SentencePiece model trained for this config stays (the next run takes it up); no shards do
    spm = run_config(tmp_path, [path], "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300",
                     "model.vocab_size=300", "tokenizer.train_documents=200")
    with pytest.raises(DataError, match=r"corpus\.jsonl:401: invalid UTF-8"):
        prepare(spm)
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir()) == [".tokenizer-config", "tokenizer.model"]


def test_a_tokenizer_that_fails_to_train_leaves_nothing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "bad \xff"}\n')
    config = run_config(tmp_path, [path], "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300",
                        "model.vocab_size=300")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: invalid UTF-8"):
        prepare_tokenizer(config)
    assert not (tmp_path / "run").exists()


def test_finished_output_is_never_undone(tmp_path):
    out = tmp_path / "data" / "train"
    out.mkdir(parents=True)
    (tmp_path / "data" / "manifest.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        with undone_on_error([out], [tmp_path / "data"], done=tmp_path / "data" / "manifest.json"):
            raise KeyboardInterrupt  # after the manifest marked the data complete
    assert out.is_dir()


def test_hub_sources_need_no_network_here(tmp_path):
    """Whether a hub dataset can be reached is not checked (that needs the network; prepare's reader says so)."""
    from ssmforge.pretrain.config import load_config

    config = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.sources=[{kind: hub, name: no/such-dataset}]"])
    preflight(config, "prepare")
    assert not (tmp_path / "run").exists()


def test_files_are_looked_at_once(tmp_path, monkeypatch):
    """A pretrain that prepares small data itself sizes the files in the same pass that checks them."""
    paths = [tmp_path / f"{i}.jsonl" for i in range(5)]
    for i, path in enumerate(paths):
        write_jsonl(path, 3, seed=i)
    calls = []
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: calls.append(Path(p)) or stat(p, *a, **k))
    preflight(run_config(tmp_path, [f"{tmp_path}/*.jsonl"]), "pretrain")
    assert sorted(p for p in calls if p.suffix == ".jsonl") == sorted(paths)
