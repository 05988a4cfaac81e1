"""prepare: the shards hold exactly the EOS-joined tokenization of the documents, split by a seeded
draw; re-runs are no-ops, other configs are refused, parallelism does not change a byte."""
import dataclasses
import json

import numpy as np
import pytest
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json

from ssmforge.data_pipeline.manifest import read_manifest
from ssmforge.data_pipeline.pack import prepare
from ssmforge.data_pipeline.tokenizer import ByteTokenizer, file_sha256
from ssmforge.errors import DataError

from .conftest import run_config, write_jsonl


def read_split(split_dir):
    """All samples of a split in file order, read with streaming's own shard reader."""
    index = json.loads((split_dir / "index.json").read_text())
    rows = []
    for info in index["shards"]:
        reader = reader_from_json(str(split_dir), None, info)
        zip_path = split_dir / info["zip_data"]["basename"]
        raw_path = split_dir / info["raw_data"]["basename"]
        if not raw_path.exists():
            raw_path.write_bytes(decompress(info["compression"], zip_path.read_bytes()))
        rows += [reader.decode_sample(reader.get_sample_data(i))["tokens"] for i in range(info["samples"])]
    return np.stack(rows)


def expected_streams(docs, seed, val_fraction):
    """The independent computation: route each document with the same seeded draw, byte-tokenize, join."""
    rng = np.random.default_rng(seed)
    tok = ByteTokenizer()
    streams = {"train": [], "val": []}
    for doc in docs:
        split = "val" if rng.random() < val_fraction else "train"
        streams[split] += tok.encode(doc) + [tok.eos_id]
    return streams


def test_shards_hold_exactly_the_tokenized_documents(tmp_path, corpus):
    path, docs = corpus
    config = run_config(tmp_path, [path])
    manifest = prepare(config)
    want = expected_streams(docs, config.seed, 0.1)
    for split in ("train", "val"):
        samples = read_split(tmp_path / "run" / "data" / split)
        assert samples.shape[1] == 33 and samples.dtype == np.uint16
        stats = manifest.splits[split]
        assert stats.samples == len(samples) and stats.tokens == samples.size
        stream = want[split]
        assert samples.reshape(-1).tolist() == stream[: samples.size]  # nothing skipped, repeated or reordered
        assert stats.dropped_tail_tokens == len(stream) - samples.size < 33
    assert manifest.splits["train"].documents + manifest.splits["val"].documents == 400
    assert manifest.sources[0]["documents"] == 400
    assert manifest.tokenizer["sha256"] == ByteTokenizer().fingerprint()


def test_the_manifest_records_that_every_document_follows_an_eos(tmp_path, corpus):
    """Evaluation reads each document after the token training put before it: the manifest says which. The
    stream is EOS-joined and holds no BOS, so it is "eos"; a manifest from before the field reads as "eos"."""
    import json

    from ssmforge.data_pipeline.manifest import MANIFEST_FILE, document_prefix

    path, _ = corpus
    manifest = prepare(run_config(tmp_path, [path]))
    tok = ByteTokenizer()
    stream = np.concatenate([read_split(tmp_path / "run" / "data" / s).reshape(-1) for s in ("train", "val")])
    assert tok.bos_id not in stream and (stream == tok.eos_id).sum() > 0
    assert manifest.tokenizer["document_prefix"] == "eos" == document_prefix(manifest.tokenizer)
    file = tmp_path / "run" / "data" / MANIFEST_FILE
    data = json.loads(file.read_text())
    del data["tokenizer"]["document_prefix"]
    file.write_text(json.dumps(data))
    assert document_prefix(read_manifest(tmp_path / "run" / "data").tokenizer) == "eos"


def test_rerun_is_a_no_op_and_another_config_is_refused(tmp_path, corpus):
    path, _ = corpus
    first = prepare(run_config(tmp_path, [path]))
    shard = tmp_path / "run" / "data" / "train" / "shard.00000.mds.zstd"
    mtime = shard.stat().st_mtime_ns
    assert prepare(run_config(tmp_path, [path])) == first and shard.stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match=r"already holds data prepared from a different config"):
        prepare(run_config(tmp_path, [path], "data.seq_len=16"))


def test_worker_count_does_not_change_the_output(tmp_path, corpus):
    path, _ = corpus
    one = prepare(run_config(tmp_path / "a", [path], "data.tokenize_workers=1"))
    two = prepare(run_config(tmp_path / "b", [path], "data.tokenize_workers=2"))
    assert one == two
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "a" / "run" / "data" / split),
                              read_split(tmp_path / "b" / "run" / "data" / split))


def test_trained_sentencepiece_goes_into_the_manifest(tmp_path, corpus):
    path, docs = corpus
    config = run_config(tmp_path, [path], "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300",
                        "model.vocab_size=300", "tokenizer.train_documents=200")
    manifest = prepare(config)
    model_file = tmp_path / "run" / "data" / "tokenizer.model"
    assert manifest.tokenizer == {"kind": "sentencepiece", "file": "tokenizer.model", "sha256": file_sha256(model_file),
                                  "vocab_size": 300, "eos_id": 2, "pad_id": 0, "bos_id": 1, "document_prefix": "eos"}
    assert read_manifest(tmp_path / "run" / "data") == manifest
    manifest.check_model_vocab(300)
    from ssmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.vocab_size=260 is smaller than the tokenizer of these shards"):
        manifest.check_model_vocab(260)


def test_model_vocab_smaller_than_tokenizer_is_refused(tmp_path, corpus):
    path, _ = corpus
    with pytest.raises(DataError, match=r"the tokenizer has 260 ids but model.vocab_size is 100"):
        prepare(run_config(tmp_path, [path], "model.vocab_size=100"))


def test_skipped_invalid_utf8_is_counted(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "bad \xff"}\n' * 50)
    manifest = prepare(run_config(tmp_path, [tmp_path / "a.jsonl"], "data.invalid_utf8=skip", "data.seq_len=8"))
    assert manifest.skipped["invalid_utf8"] == 50
    assert manifest.splits["train"].documents + manifest.splits["val"].documents == 50


def test_leftovers_of_a_crashed_run_are_replaced_but_foreign_files_refused(tmp_path, corpus):
    path, _ = corpus
    data = tmp_path / "run" / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "shard.00000.mds.zstd").write_bytes(b"half written")
    manifest = prepare(run_config(tmp_path, [path]))
    assert manifest.splits["train"].samples > 0
    other = tmp_path / "other" / "run" / "data"
    other.mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"folder is not empty and holds no ssmforge manifest"):
        prepare(run_config(tmp_path / "other", [path]))


def test_too_little_data(tmp_path):
    write_jsonl(tmp_path / "tiny.jsonl", 1)
    with pytest.raises(DataError, match=r"fewer than one training sample"):
        prepare(run_config(tmp_path, [tmp_path / "tiny.jsonl"], "data.seq_len=4096"))


def test_synthetic_source_records_its_entropy_floor(tmp_path):
    from ssmforge.data_pipeline.synthetic import SyntheticCorpus
    from ssmforge.pretrain.config import load_config

    config = load_config(None, [f"run_dir={tmp_path}", "data.sources=[{kind: synthetic, max_documents: 300}]",
                                "data.seq_len=64", "data.val_fraction=0.2", "model.vocab_size=260"])
    manifest = prepare(config)
    docs = list(SyntheticCorpus(seed=config.seed).documents(300))
    rng = np.random.default_rng(config.seed)
    val = [d for d in docs if rng.random() < 0.2]
    val_tokens = sum(len(d.text.encode()) + 1 for d in val)
    stats = manifest.splits["val"]
    assert stats.documents == len(val)
    assert stats.surprisal_nats == pytest.approx(sum(d.surprisal_nats for d in val), rel=1e-9)
    assert stats.entropy_floor_nats_per_token == pytest.approx(stats.surprisal_nats / val_tokens, rel=1e-9)
    assert 0.3 < stats.entropy_floor_nats_per_token < 0.8


def test_a_run_with_another_tokenizer_than_the_shards_is_refused(tmp_path, corpus):
    path, _ = corpus
    manifest = prepare(run_config(tmp_path, [path]))  # byte tokenizer
    where = "run/data/manifest.json"
    manifest.check_tokenizer("byte", None, where)  # the same tokenizer passes
    with pytest.raises(DataError, match=r"manifest\.json: the shards were made with a 'byte' tokenizer, but "
                                        r"tokenizer\.kind='sentencepiece'"):
        manifest.check_tokenizer("sentencepiece", None, where)
    swapped = tmp_path / "tokenizer.json"
    swapped.write_text("{}")  # a tokenizer file whose contents are not those the shards were made with
    hf = dataclasses.replace(manifest, tokenizer={**manifest.tokenizer, "kind": "hf", "sha256": "0" * 64})
    with pytest.raises(DataError, match=rf"made with another tokenizer \(sha256 000000000000\) than "
                                        rf"tokenizer\.path={swapped}"):
        hf.check_tokenizer("hf", str(swapped), where)


# -- token budgets ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over", [0, 1, 17])
def test_a_token_budget_stops_after_the_document_that_reaches_it(tmp_path, corpus, over):
    path, docs = corpus
    lengths = [len(d.encode()) + 1 for d in docs]  # byte tokens: UTF-8 bytes plus the EOS
    cumulative = np.cumsum(lengths)
    taken = 150  # the budget falls inside document 150 (or exactly at its end, over=0)
    budget = int(cumulative[taken - 1]) - over
    assert over < lengths[taken - 1]
    config = run_config(tmp_path, [path], f"data.sources.0.max_tokens={budget}")
    manifest = prepare(config)
    assert manifest.sources[0]["documents"] == taken
    assert manifest.sources[0]["tokens"] == cumulative[taken - 1] >= budget > cumulative[taken - 2]
    want = expected_streams(docs[:taken], config.seed, 0.1)  # exactly the first 150 documents, whole
    for split in ("train", "val"):
        samples = read_split(tmp_path / "run" / "data" / split).reshape(-1).tolist()
        assert samples == want[split][:len(samples)] and len(want[split]) - len(samples) < 33
        assert manifest.splits[split].dropped_tail_tokens == len(want[split]) - len(samples)
    assert sum(s.documents for s in manifest.splits.values()) == taken


def test_a_budget_counts_the_runs_own_tokenizer(tmp_path, corpus):
    import sentencepiece as spm

    path, docs = corpus
    args = ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300", "model.vocab_size=300",
            "tokenizer.train_documents=400"]
    prepare(run_config(tmp_path / "all", [path], *args))
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "all" / "run" / "data" / "tokenizer.model"))
    cumulative = np.cumsum([len(ids) + 1 for ids in plain.encode(docs)])
    budget = int(cumulative[99]) - 1  # reached inside document 100
    manifest = prepare(run_config(tmp_path / "budget", [path], *args, f"data.sources.0.max_tokens={budget}"))
    assert (manifest.sources[0]["documents"], manifest.sources[0]["tokens"]) == (100, cumulative[99])
    split_tokens = sum(s.tokens + s.dropped_tail_tokens for s in manifest.splits.values())
    assert split_tokens == cumulative[99]


def test_a_budget_on_one_source_ends_the_mixture(tmp_path):
    from ssmforge.data_pipeline.sources import SkipCounter, mixed_documents
    from ssmforge.pretrain.config import SourceConfig

    a, b = write_jsonl(tmp_path / "a.jsonl", 300, seed=1), write_jsonl(tmp_path / "b.jsonl", 300, seed=2)
    sources = json.dumps([{"kind": "local", "paths": [str(tmp_path / "a.jsonl")], "max_tokens": 3000},
                          {"kind": "local", "paths": [str(tmp_path / "b.jsonl")]}])
    config = run_config(tmp_path, [], f"data.sources={sources}")
    manifest = prepare(config)
    # the unbudgeted mixture, cut by hand: a's tokens reach 3000 at some document; the stream ends where a is next
    unbudgeted = [SourceConfig(kind="local", paths=[str(tmp_path / n)]) for n in ("a.jsonl", "b.jsonl")]
    mixture = list(mixed_documents(unbudgeted, config.seed, "fail", SkipCounter()))
    kept, spent, tokens = [], False, [0, 0]
    for source, text, _ in mixture:
        if source == 0 and spent:
            break
        kept.append((source, text))
        tokens[source] += len(text.encode()) + 1
        spent = spent or tokens[0] >= 3000
    assert [s["documents"] for s in manifest.sources] == [sum(s == 0 for s, _ in kept), sum(s == 1 for s, _ in kept)]
    assert [s["tokens"] for s in manifest.sources] == tokens and tokens[0] >= 3000
    want = expected_streams([text for _, text in kept], config.seed, 0.1)
    samples = read_split(tmp_path / "run" / "data" / "train").reshape(-1).tolist()
    assert samples == want["train"][:len(samples)] and len(want["train"]) - len(samples) < 33


def test_budgets_are_part_of_the_fingerprint_and_none_changes_nothing(tmp_path, corpus):
    from ssmforge.data_pipeline.manifest import fingerprint
    from ssmforge.data_pipeline.pack import data_fingerprint

    path, _ = corpus
    plain = run_config(tmp_path, [path])
    settings = dataclasses.asdict(plain.data.sources[0])
    del settings["max_tokens"]  # the settings as a config without budgets spelled them
    tokenizer = dataclasses.asdict(plain.tokenizer)
    del tokenizer["allow_lossy"]
    assert data_fingerprint(plain) == fingerprint({"sources": [settings], "tokenizer": tokenizer, "seq_len": 32,
                                                   "val_fraction": 0.1, "invalid_utf8": "fail",
                                                   "seed": plain.seed})
    assert data_fingerprint(run_config(tmp_path, [path], "data.sources.0.max_tokens=1000")) != data_fingerprint(plain)


def test_progress_is_logged_when_stderr_is_not_a_terminal(tmp_path, corpus, monkeypatch, caplog):
    import logging

    from ssmforge.data_pipeline import pack

    path, docs = corpus
    monkeypatch.setattr(pack, "LOG_EVERY_S", 0.0)  # a line per block instead of one a minute
    monkeypatch.setattr(pack, "BATCH_DOCUMENTS", 100)
    with caplog.at_level(logging.INFO, logger="ssmforge.data_pipeline.pack"):
        prepare(run_config(tmp_path, [path]))
    lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage() and r.getMessage().startswith(
        "prepare: ")]
    total = sum(len(d.encode()) + 1 for d in docs) / 1e6
    assert len(lines) == 4 and lines[-1].startswith(f"prepare: {total:.1f}M tokens, ")
