"""`prepare`: sources -> tokenizer -> EOS-joined token stream -> samples of seq_len + 1 -> MDS shards.

Documents are routed to the train or validation split by a seeded draw, tokenized in a process pool
(order kept, so the output is a pure function of the config), joined with EOS, and cut into samples
of seq_len + 1 tokens written with mosaicml-streaming's MDSWriter (zstd, xxh64 hashes). The last
incomplete sample of each split is dropped and counted in the manifest. Shards go to a local folder
or, through streaming's uploaders, to a remote (s3://, gs://, ...).
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from itertools import islice
from pathlib import Path

import numpy as np

from ssmforge.errors import DataError

from .manifest import MANIFEST_FILE, Manifest, SplitStats, find_manifest, fingerprint, is_remote
from .sources import SkipCounter, mixed_documents
from .tokenizer import (SENTENCEPIECE_TRAINER_VERSION, ByteTokenizer, load_tokenizer, require_lossless,
                        train_sentencepiece)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.model"
BATCH_DOCUMENTS = 256  # documents per task sent to a tokenizer process
SHARD_BYTES = 1 << 26


def data_fingerprint(config) -> str:
    """Everything that changes the shards: sources, tokenizer, seq_len, split and seed."""
    tokenizer = dataclasses.asdict(config.tokenizer)
    del tokenizer["allow_lossy"]  # a permission, not a setting: the shards are the same either way
    if tokenizer["kind"] == "sentencepiece" and not tokenizer["path"]:
        tokenizer["trainer_version"] = SENTENCEPIECE_TRAINER_VERSION  # shards of an older trainer are other data
    return fingerprint({
        "sources": [dataclasses.asdict(s) for s in config.data.sources],
        "tokenizer": tokenizer,
        "seq_len": config.data.seq_len,
        "val_fraction": config.data.val_fraction,
        "invalid_utf8": config.data.invalid_utf8,
        "seed": config.seed,
    })


# -- tokenizer processes ---------------------------------------------------------------------------
_worker = {}


def _init_worker(kind: str, path: str | None, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(kind, path)
    _worker.update(tokenizer=tokenizer, eos=np.array([tokenizer.eos_id], dtype=dtype), dtype=dtype)


def _tokenize(texts: list[str]) -> list[np.ndarray]:
    """Each document's ids with EOS appended, already in the shard dtype (half the bytes to send back)."""
    eos, dtype = _worker["eos"], _worker["dtype"]
    return [np.concatenate([ids.astype(dtype, copy=False), eos]) for ids in _worker["tokenizer"].encode_batch(texts)]


def _tokenized(pool, documents, window: int):
    """(batch of documents, their token arrays) in input order, with at most `window` batches in
    flight so that an endless hub stream never piles up in memory."""
    inflight = deque()
    while batch := list(islice(documents, BATCH_DOCUMENTS)):
        inflight.append((batch, pool.apply_async(_tokenize, ([text for _, text, _ in batch],))))
        if len(inflight) >= window:
            done, result = inflight.popleft()
            yield done, result.get()
    while inflight:
        done, result = inflight.popleft()
        yield done, result.get()


# -- the stage -------------------------------------------------------------------------------------
class SplitWriter:
    """Accumulates one split's EOS-joined token stream and writes full samples to an MDSWriter."""

    def __init__(self, writer, seq_len: int, dtype: np.dtype, track_surprisal: bool):
        self.writer, self.width, self.dtype = writer, seq_len + 1, dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.stats = SplitStats(surprisal_nats=0.0 if track_surprisal else None)

    def add(self, documents: list[np.ndarray], surprisals: list[float | None]) -> None:
        """Append documents (token arrays ending in EOS) and write every sample they complete."""
        self.stats.documents += len(documents)
        if self.stats.surprisal_nats is not None:
            self.stats.surprisal_nats += sum(surprisals)
        self.pending += documents
        self.pending_tokens += sum(len(d) for d in documents)
        if self.pending_tokens >= self.width:
            stream = np.concatenate(self.pending)
            full = len(stream) // self.width * self.width
            for sample in stream[:full].reshape(-1, self.width):
                self.writer.write({"tokens": sample})
            self.stats.samples += full // self.width
            self.stats.tokens += full
            rest = stream[full:]
            self.pending, self.pending_tokens = [rest], len(rest)

    def finish(self) -> SplitStats:
        self.stats.dropped_tail_tokens = self.pending_tokens
        self.writer.finish()
        return self.stats


def _resolve_tokenizer(config, work_dir: Path, skipped: SkipCounter):
    """The tokenizer of the config: byte, a given file (refused if it would change the documents, unless
    tokenizer.allow_lossy), or a SentencePiece model trained here (lossless by construction)."""
    tok = config.tokenizer
    if tok.kind == "byte":
        return ByteTokenizer(), None
    if tok.path:
        tokenizer = load_tokenizer(tok.kind, tok.path)
        if not tok.allow_lossy:
            require_lossless(tokenizer, tok.path)
        return tokenizer, tok.path
    sample = (text for _, text, _ in islice(
        mixed_documents(config.data.sources, config.seed, config.data.invalid_utf8, SkipCounter()),
        tok.train_documents))
    log.info("training a %s SentencePiece tokenizer (vocab %d) on up to %d documents", tok.model_type,
             tok.vocab_size, tok.train_documents)
    path = work_dir / TOKENIZER_FILE
    return train_sentencepiece(sample, path, tok.vocab_size, tok.model_type), str(path)


def _check_destination(out: str, local: Path, expected: str) -> Manifest | None:
    """The existing manifest if this exact dataset is already there; refuse a different one."""
    existing = find_manifest(out, local)
    if existing is not None:
        if existing.fingerprint != expected:
            raise DataError(f"{out}: already holds data prepared from a different config (fingerprint "
                            f"{existing.fingerprint[:12]}, this config {expected[:12]}); choose another "
                            f"data.shard_dir or remove that folder")
        return existing
    leftovers = [p.name for p in local.iterdir()] if local.is_dir() else []
    if any(name not in (*SPLITS, TOKENIZER_FILE, ".preparing") for name in leftovers):
        raise DataError(f"{out}: folder is not empty and holds no ssmforge manifest; refusing to write into it")
    return None


def prepare(config, workers: int | None = None) -> Manifest:
    """Build the shards for `config.data` into `config.data.shard_dir`; idempotent (see module doc)."""
    from streaming import MDSWriter

    out = config.data.shard_dir
    remote = is_remote(out)
    local = Path(config.data.cache_dir) / "prepare" if remote else Path(out)
    local.mkdir(parents=True, exist_ok=True)
    expected = data_fingerprint(config)
    existing = _check_destination(out, local, expected)
    if existing is not None:
        log.info("%s already holds this dataset (%d train samples); nothing to do", out,
                 existing.splits["train"].samples)
        return existing
    for name in SPLITS:  # a run that died half-way left these; they are ours (no manifest yet)
        shutil.rmtree(local / name, ignore_errors=True)

    skipped = SkipCounter()
    tokenizer, tokenizer_path = _resolve_tokenizer(config, local, skipped)
    if tokenizer.eos_id is None or tokenizer.eos_id < 0:
        raise DataError(f"{tokenizer_path}: the tokenizer has no EOS id, needed between documents")
    if tokenizer.vocab_size > config.model.padded_vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size is "
                        f"{config.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    seq_len = config.data.seq_len
    all_synthetic = all(s.kind == "synthetic" for s in config.data.sources)
    writers = {
        name: SplitWriter(MDSWriter(
            out=(str(local / name), f"{out.rstrip('/')}/{name}") if remote else str(local / name),
            columns={"tokens": f"ndarray:{dtype.name}:{seq_len + 1}"}, compression="zstd", hashes=["xxh64"],
            size_limit=SHARD_BYTES, exist_ok=True), seq_len, dtype, all_synthetic)
        for name in SPLITS
    }
    per_source = [0] * len(config.data.sources)
    documents = mixed_documents(config.data.sources, config.seed, config.data.invalid_utf8, skipped)
    split_rng = np.random.default_rng(config.seed)
    workers = workers or config.data.tokenize_workers or os.cpu_count() or 1
    kind = "byte" if isinstance(tokenizer, ByteTokenizer) else config.tokenizer.kind
    start, total_tokens = time.perf_counter(), 0
    progress = _progress()
    # forkserver: workers come from a clean process, never forked from one that runs gloo/NCCL threads
    with multiprocessing.get_context("forkserver").Pool(workers, _init_worker, (kind, tokenizer_path, dtype.name)) as pool:
        for batch, tokens_of_batch in _tokenized(pool, documents, window=2 * workers):
            # one seeded draw per document, in order: the same stream as drawing them one at a time
            to_val = split_rng.random(len(batch)) < config.data.val_fraction
            for split, flag in (("train", False), ("val", True)):
                chosen = [i for i in range(len(batch)) if to_val[i] == flag]
                writers[split].add([tokens_of_batch[i] for i in chosen], [batch[i][2] for i in chosen])
            for source, _, _ in batch:
                per_source[source] += 1
            total_tokens += sum(len(t) for t in tokens_of_batch)
            progress(total_tokens, start)
    stats = {name: writer.finish() for name, writer in writers.items()}
    elapsed = time.perf_counter() - start
    if stats["train"].samples == 0:
        raise DataError(f"{out}: the sources gave {total_tokens} tokens, fewer than one training sample of "
                        f"{seq_len + 1}; add data or lower data.seq_len")
    manifest = Manifest(
        fingerprint=expected, seq_len=seq_len, token_dtype=dtype.name, seed=config.seed,
        tokenizer={"kind": kind, "file": TOKENIZER_FILE if tokenizer_path else None,
                   "sha256": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size,
                   "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id},
        sources=[{**dataclasses.asdict(s), "documents": n} for s, n in zip(config.data.sources, per_source)],
        splits=stats, skipped=dataclasses.asdict(skipped),
    )
    if tokenizer_path and Path(tokenizer_path) != local / TOKENIZER_FILE:
        shutil.copyfile(tokenizer_path, local / TOKENIZER_FILE)
    manifest.write(local)  # last: its presence marks the dataset complete
    if remote:
        _upload(local, out, [TOKENIZER_FILE] * bool(tokenizer_path) + [MANIFEST_FILE])
    if progress.bar is not None:
        progress.bar.close()
    log.info("prepared %s: %d documents, %d tokens in %.1fs (%.2fM tokens/s); train %d samples, val %d samples%s",
             out, sum(per_source), total_tokens, elapsed, total_tokens / max(elapsed, 1e-9) / 1e6,
             stats["train"].samples, stats["val"].samples,
             f"; skipped {skipped.invalid_utf8} documents with invalid UTF-8" if skipped.invalid_utf8 else "")
    return manifest


def _upload(local: Path, remote: str, names: list[str]) -> None:
    from streaming.base.storage import CloudUploader

    uploader = CloudUploader.get((str(local), remote), exist_ok=True)
    for name in names:
        uploader.upload_file(name)


class _progress:
    """A tqdm bar of tokens with tokens/s on a terminal; silent otherwise."""

    def __init__(self):
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="tok", unit_scale=True, desc="prepare")

    def __call__(self, total_tokens: int, start: float) -> None:
        if self.bar is not None:
            self.bar.update(total_tokens - self.bar.n)
