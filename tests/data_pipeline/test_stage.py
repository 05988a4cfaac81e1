"""Preparation as a stage of its own: a prepare split into parts holds the documents of a single job's, parts
are idempotent and refuse what they cannot do, and a training job prepares only small data itself: for
anything larger every rank stops at once with one line."""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ssmforge.data_pipeline import pack
from ssmforge.data_pipeline import parts as pack_parts
from ssmforge.data_pipeline.manifest import read_manifest
from ssmforge.data_pipeline.pack import prepare, prepare_in_job, prepare_tokenizer
from ssmforge.data_pipeline.parts import merge_parts, prepare_part
from ssmforge.data_pipeline.tokenizer import ByteTokenizer
from ssmforge.errors import ConfigError, DataError

from .conftest import run_config, write_jsonl
from .test_pack import read_split

ROOT = Path(__file__).resolve().parents[2]
EOS = 2


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 16 documents, so that a 400-document corpus spreads over every part."""
    monkeypatch.setattr(pack, "BATCH_DOCUMENTS", 16)


def split_documents(stream):
    """(complete documents as tuples of ids, EOS included; the ids after the last EOS)."""
    stream = list(map(int, stream))
    ends = [i for i, t in enumerate(stream) if t == EOS]
    starts = [0] + [e + 1 for e in ends]
    return [tuple(stream[s:e + 1]) for s, e in zip(starts, ends)], tuple(stream[starts[-1]:])


def expected_documents(encoded, seed, val_fraction, width):
    """The independent computation, per split: route each document (ids + EOS) with the seeded draw, join them,
    keep the samples a single job writes, and split what they hold back into documents."""
    rng = np.random.default_rng(seed)
    streams = {"train": [], "val": []}
    for ids in encoded:
        streams["val" if rng.random() < val_fraction else "train"] += list(ids) + [EOS]
    return {split: split_documents(s[:len(s) // width * width]) for split, s in streams.items()}


def part_streams(split_dir, manifest, split):
    """Each part's stream as a merged dataset holds it: the samples of its own folder in index order, then its
    share of joint/ (manifest.parts gives the order of the shares and their lengths)."""
    index = json.loads((split_dir / "index.json").read_text())
    rows = read_split(split_dir)
    folders, at = {}, 0
    for shard in index["shards"]:
        folder = shard["zip_data"]["basename"].split("/")[0]
        folders.setdefault(folder, []).append(rows[at:at + shard["samples"]].reshape(-1))
        at += shard["samples"]
    joint = np.concatenate(folders.pop("joint", [np.zeros(0, np.uint16)]))
    layout = manifest.parts["joint"][split]
    streams, at = {}, 0
    for part, n in zip(layout["order"], layout["held_tokens"]):
        own = folders.get(pack_parts.part_name(part, manifest.parts["count"]), [np.zeros(0, np.uint16)])
        streams[part] = np.concatenate(own + [joint[at:at + n]])
        at += n
    assert at == len(joint)
    return [streams[p] for p in layout["order"]]


def assert_same_documents(merged, single, want, split):
    """The merged dataset's documents are the single job's, and both are the expected ones: every part's stream
    ends with a whole document but the last in the joint order, which ends with the document the tail cuts."""
    single_docs, single_cut = split_documents(read_split(single / split).reshape(-1))
    docs, cuts = [], []
    for stream in part_streams(merged / split, read_manifest(merged), split):
        complete, cut = split_documents(stream)
        docs += complete
        cuts.append(cut)
    want_docs, want_cut = want[split]
    assert Counter(docs) == Counter(single_docs) == Counter(want_docs)
    assert cuts[-1] == single_cut == want_cut and all(c == () for c in cuts[:-1])


@pytest.mark.parametrize("parts, block, seq_len", [
    (2, 16, 32), (3, 16, 32), (5, 16, 32),
    (3, 1, 1000), (4, 2, 700),  # the dropped tail spans several documents, of several parts
])
def test_parts_hold_exactly_the_documents_of_one_job(tmp_path, corpus, monkeypatch, parts, block, seq_len):
    monkeypatch.setattr(pack, "BATCH_DOCUMENTS", block)
    path, docs = corpus
    one = prepare(run_config(tmp_path / "one", [path], f"data.seq_len={seq_len}"))
    config = run_config(tmp_path / "many", [path], f"data.seq_len={seq_len}")
    results = [prepare_part(config, i, parts) for i in reversed(range(parts))]  # any order; the last one merges
    assert [r.done for r in results] == list(range(1, parts + 1))
    assert all(r.manifest is None for r in results[:-1])
    merged = results[-1].manifest
    assert merged == read_manifest(tmp_path / "many" / "run" / "data")
    assert merged.splits == one.splits  # samples, tokens, documents, dropped tail: all the same
    assert merged.sources == one.sources and merged.tokenizer == one.tokenizer
    assert merged.fingerprint == one.fingerprint and merged.parts["count"] == parts
    want = expected_documents([ByteTokenizer().encode(d) for d in docs], config.seed, 0.1, seq_len + 1)
    for split in ("train", "val"):
        assert_same_documents(tmp_path / "many" / "run" / "data", tmp_path / "one" / "run" / "data", want, split)
    per_part = [r.record["splits"]["train"]["documents"] for r in results]
    assert min(per_part) > 0 and sum(per_part) == one.splits["train"].documents  # every part did work


def test_parts_with_a_tokenizer_trained_once(tmp_path, corpus):
    import sentencepiece as spm

    path, docs = corpus
    args = ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300", "model.vocab_size=300",
            "tokenizer.train_documents=200"]
    config = run_config(tmp_path / "many", [path], *args)
    with pytest.raises(DataError, match=r"no trained tokenizer for this config; .* run `ssmforge prepare CONFIG "
                                        r"--train-tokenizer` first"):
        prepare_part(config, 0, 3)
    model = prepare_tokenizer(config)
    assert model == str(tmp_path / "many" / "run" / "data" / "tokenizer.model")
    mtime = Path(model).stat().st_mtime_ns
    assert prepare_tokenizer(config) == model and Path(model).stat().st_mtime_ns == mtime  # trained once
    for part in range(3):
        manifest = prepare_part(config, part, 3).manifest
    assert Path(model).stat().st_mtime_ns == mtime
    one = prepare(run_config(tmp_path / "one", [path], *args[:1], f"tokenizer.path={model}", *args[2:]))
    assert manifest.splits == one.splits and manifest.tokenizer == one.tokenizer
    plain = spm.SentencePieceProcessor(model_file=model)  # the file alone, not our word cache
    want = expected_documents(plain.encode(docs), config.seed, 0.1, 33)
    for split in ("train", "val"):
        assert_same_documents(tmp_path / "many" / "run" / "data", tmp_path / "one" / "run" / "data", want, split)


def test_synthetic_parts_keep_the_entropy_floor(tmp_path):
    from ssmforge.pretrain.config import load_config

    def config(where):
        return load_config(None, [f"run_dir={where}", "data.sources=[{kind: synthetic, max_documents: 300}]",
                                  "data.seq_len=64", "data.val_fraction=0.2", "model.vocab_size=260"])

    one = prepare(config(tmp_path / "one"))
    for part in range(3):
        merged = prepare_part(config(tmp_path / "many"), part, 3).manifest
    for split in ("train", "val"):
        a, b = one.splits[split], merged.splits[split]
        assert (a.samples, a.tokens, a.documents, a.dropped_tail_tokens) == (
            b.samples, b.tokens, b.documents, b.dropped_tail_tokens)
        assert b.surprisal_nats == pytest.approx(a.surprisal_nats, rel=1e-12)
        assert b.entropy_floor_nats_per_token == pytest.approx(a.entropy_floor_nats_per_token, rel=1e-12)


def test_the_loader_reads_a_merged_dataset(tmp_path, corpus):
    import torch

    from ssmforge.data_pipeline.loader import build_loader

    path, _ = corpus
    config = run_config(tmp_path, [path])
    for part in range(3):
        manifest = prepare_part(config, part, 3).manifest
    loader = build_loader(config.data.shard_dir, "train", 4, 5, config.data.cache_dir)
    rows = torch.cat(list(loader))
    samples = read_split(tmp_path / "run" / "data" / "train")
    assert len(rows) == manifest.splits["train"].samples // 4 * 4
    assert Counter(map(tuple, rows.tolist())) <= Counter(map(tuple, samples.astype(np.int64).tolist()))


def test_parts_are_idempotent_and_start_over_when_they_died(tmp_path, corpus):
    path, _ = corpus
    config = run_config(tmp_path, [path])
    data = tmp_path / "run" / "data"
    first = prepare_part(config, 1, 3)
    record = data / "parts" / "part-00001-of-00003.json"
    shard = data / "train" / "part-00001-of-00003" / "shard.00000.mds.zstd"
    stamps = record.stat().st_mtime_ns, shard.stat().st_mtime_ns
    again = prepare_part(config, 1, 3)  # finished: nothing to do
    assert again.record == first.record and (record.stat().st_mtime_ns, shard.stat().st_mtime_ns) == stamps
    (data / "train" / "part-00002-of-00003").mkdir(parents=True)
    (data / "train" / "part-00002-of-00003" / "shard.00007.mds.zstd").write_bytes(b"half written")
    prepare_part(config, 2, 3)  # a part that died half-way left files and no record: replaced
    assert not (data / "train" / "part-00002-of-00003" / "shard.00007.mds.zstd").exists()
    with pytest.raises(DataError, match=r"parts 0 of 3 are not done yet; run them"):
        merge_parts(config)
    manifest = prepare_part(config, 0, 3).manifest
    assert merge_parts(config) == manifest == prepare_part(config, 2, 3).manifest  # done: nothing to do
    assert prepare(config) == manifest


def test_two_parts_finishing_together_still_merge(tmp_path, corpus, monkeypatch):
    """Part 0 finishes while part 1 works (SLURM array tasks run at once): part 0 sees part 1 missing and
    leaves the merge; part 1, which found no finished part when it started, must see part 0 at its end."""
    path, _ = corpus
    config = run_config(tmp_path, [path])
    original = pack_parts._prepare_part

    def part_0_finishes_meanwhile(config, local, expected, part, parts, workers):
        if part == 1:
            assert prepare_part(config, 0, 2).manifest is None
        return original(config, local, expected, part, parts, workers)

    monkeypatch.setattr(pack_parts, "_prepare_part", part_0_finishes_meanwhile)
    result = prepare_part(config, 1, 2)
    assert result.done == 2 and result.manifest == read_manifest(tmp_path / "run" / "data")


def test_what_parts_refuse(tmp_path, corpus):
    path, _ = corpus
    prepare_part(run_config(tmp_path, [path]), 0, 3)
    with pytest.raises(DataError, match=r"holds parts of a prepare in 3 parts, not 4; use --parts 3"):
        prepare_part(run_config(tmp_path, [path]), 1, 4)
    with pytest.raises(DataError, match=r"a part prepared from a different config"):
        prepare_part(run_config(tmp_path, [path], "data.seq_len=16"), 1, 3)
    with pytest.raises(ConfigError, match=r"data\.sources\.0\.max_tokens=5000 cannot be split over parts"):
        prepare_part(run_config(tmp_path / "b", [path], "data.sources.0.max_tokens=5000"), 0, 2)
    with pytest.raises(DataError, match=r"a prepare in parts writes into a folder every part shares"):
        prepare_part(run_config(tmp_path / "c", [path], "data.shard_dir=s3://bucket/x"), 0, 2)
    with pytest.raises(ConfigError, match=r"--part 3 --parts 3: the part must be in 0\.\.2"):
        prepare_part(run_config(tmp_path, [path]), 3, 3)
    with pytest.raises(DataError, match=r"no finished parts to merge"):
        merge_parts(run_config(tmp_path / "d", [path]))


# -- the command line -------------------------------------------------------------------------------------------
def ssmforge(*args, env=None, code=0):
    env = {k: v for k, v in {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}.items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", "ssmforge", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == code, proc.stderr[-3000:]
    if code == 2:
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc


def test_prepare_in_parts_from_a_slurm_array(tmp_path):
    args = ("prepare", "configs/tiny.yaml", f"run_dir={tmp_path}",
            "data.sources=[{kind: synthetic, max_documents: 600}]", "--parts", "2")
    array = {"SLURM_ARRAY_TASK_MIN": "6", "SLURM_ARRAY_TASK_COUNT": "2"}
    out = ssmforge(*args, env={**array, "SLURM_ARRAY_TASK_ID": "7"}).stdout  # task 7 of 6..7: part 1
    assert out.startswith("part 1 of 2: ") and "1 of 2 parts done" in out and "--merge" in out
    assert (tmp_path / "data" / "parts" / "part-00001-of-00002.json").is_file()
    out = ssmforge(*args, env={**array, "SLURM_ARRAY_TASK_ID": "6"}).stdout
    assert "2 of 2 parts done" in out and "train: " in out and "entropy floor" in out
    assert read_manifest(tmp_path / "data").parts["count"] == 2
    wrong = ssmforge(*args, env={**array, "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "3"}, code=2)
    assert "--parts 2 but the SLURM array has 3 tasks" in wrong.stderr
    alone = ssmforge(*args, env={"SLURM_ARRAY_TASK_ID": None}, code=2)
    assert "--parts 2 needs --part I, or to run as a SLURM array task (sbatch --array=0-1)" in alone.stderr


def test_train_tokenizer_alone(tmp_path):
    base = ("prepare", "configs/tiny.yaml", f"run_dir={tmp_path}",
            "data.sources=[{kind: synthetic, max_documents: 300}]")
    assert "tokenizer.kind=byte: nothing to train" in ssmforge(*base, "--train-tokenizer").stdout
    out = ssmforge(*base, "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=400", "model.vocab_size=400",
                   "--train-tokenizer").stdout
    assert out.strip() == f"tokenizer: {tmp_path / 'data' / 'tokenizer.model'}"
    assert (tmp_path / "data" / "tokenizer.model").is_file() and not (tmp_path / "data" / "manifest.json").exists()


# -- inside a training job ---------------------------------------------------------------------------------------
PROBE = """
import json, sys
from ssmforge.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "deepspeed": "deepspeed" in sys.modules}))
"""


def test_pretrain_refuses_to_prepare_a_hub_source_at_once(tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "configs/tiny.yaml", f"run_dir={run}",
            "data.sources=[{kind: hub, name: monology/pile-uncopyrighted}]"]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "torch": False, "deepspeed": False}  # before torch, DeepSpeed or the network
    (line,) = proc.stderr.strip().splitlines()
    assert line == (f"ssmforge: error: {run}/data holds no prepared shards, and data.sources.0 (hub dataset "
                    f"monology/pile-uncopyrighted) is too large to prepare inside a training job; run `ssmforge "
                    f"prepare configs/tiny.yaml run_dir={run} 'data.sources=[{{kind: hub, name: "
                    f"monology/pile-uncopyrighted}}]'` first (`ssmforge submit` runs it as a job of its own before "
                    f"training)")
    assert not run.exists()  # no run folder, no lock


def test_pretrain_still_prepares_a_small_local_source(tmp_path, corpus):
    path, docs = corpus
    run = tmp_path / "run"
    ssmforge("pretrain", "configs/tiny.yaml", f"run_dir={run}", f"data.sources=[{{kind: local, paths: [{path}]}}]",
             "train.max_steps=2", "data.num_workers=0", "train.eval_every=100", "train.save_every=100")
    manifest = read_manifest(run / "data")
    assert manifest.sources[0]["documents"] == len(docs)
    assert manifest.sources[0]["tokens"] == sum(len(d.encode()) + 1 for d in docs)
    assert (run / "checkpoints" / "step_00000002").is_dir()


def test_which_data_a_job_prepares_itself(tmp_path, corpus):
    path, _ = corpus
    assert prepare_in_job(run_config(tmp_path / "a", [path])) is True  # 400 short documents
    from ssmforge.pretrain.config import load_config

    synthetic = load_config(None, [f"run_dir={tmp_path / 'b'}",
                                   "data.sources=[{kind: synthetic, max_documents: 1000}]"])
    assert prepare_in_job(synthetic) is True
    many = load_config(None, [f"run_dir={tmp_path / 'b'}", "data.sources=[{kind: synthetic, max_documents: 100001}]"])
    with pytest.raises(DataError, match=r"data\.sources\.0 \(synthetic, 100001 documents, more than 100,000\) is too "
                                        r"large to prepare inside a training job; run `ssmforge prepare CONFIG` first"):
        prepare_in_job(many)
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 65 MiB by its size, no disk used
        f.truncate(65 << 20)
    with pytest.raises(DataError, match=r"the local files \(65 MiB, more than 64 MiB\) is too large"):
        prepare_in_job(run_config(tmp_path / "c", [path, big]))
    prepare(run_config(tmp_path / "a", [path]))
    assert prepare_in_job(run_config(tmp_path / "a", [path])) is False  # prepared: nothing to do
    with pytest.raises(DataError, match=r"already holds data prepared from a different config"):
        prepare_in_job(run_config(tmp_path / "a", [path], "data.seq_len=16"))


def test_every_rank_stops_alike(tmp_path, corpus):
    from ssmforge.pretrain.config import load_config
    from ssmforge.pretrain.launch import World
    from ssmforge.pretrain.trainer import ensure_prepared

    hub = load_config(None, [f"run_dir={tmp_path / 'hub'}", "data.sources=[{kind: hub, name: wikitext}]"])
    errors = []
    for rank in range(2):
        with pytest.raises(DataError) as error:
            ensure_prepared(hub, World(rank, 2, rank, 2))
        errors.append(str(error.value))
    assert errors[0] == errors[1] and "too large to prepare inside a training job" in errors[0]
    path, docs = corpus
    small = run_config(tmp_path / "small", [path], "model.vocab_size=260")
    manifest = ensure_prepared(small, World(0, 1, 0, 1))  # rank 0 of 1 prepares it
    assert manifest.sources[0]["documents"] == len(docs) and manifest == read_manifest(small.data.shard_dir)


def test_one_part_is_a_prepare_too(tmp_path, corpus):
    path, _ = corpus
    one = prepare(run_config(tmp_path / "one", [path], "data.sources.0.max_tokens=20000"))
    alone = prepare_part(run_config(tmp_path / "parts", [path], "data.sources.0.max_tokens=20000"), 0, 1)
    assert alone.done == 1 and alone.manifest.splits == one.splits and alone.manifest.sources == one.sources
