"""`prepare`: sources -> tokenizer -> EOS-joined token stream -> samples of seq_len + 1 -> MDS shards.

Documents are routed to the train or validation split by a seeded draw, tokenized in a process pool
(order kept, so the output is a pure function of the config), joined with EOS, and cut into samples
of seq_len + 1 tokens written as MDS shards (data_pipeline.shards: zstd, xxh64 hashes; the pool compresses
them too). The last incomplete sample of each split is dropped and counted in the manifest. Shards go
to a local folder or, through streaming's uploaders, to a remote (s3://, gs://, ...).

Here: the prepare of one job (`prepare`), the tokenizer it packs with (a file, or one trained once into the
shard folder: `prepare_tokenizer`), the packing itself (`_pack`: the tokenizer processes and the SplitPacker,
which a prepare in parts runs too), and what a training job decides before it starts (`prepare_in_job`,
`needs_preparation_job` for `ssmforge submit`, `shards_ready`). Preparation is a stage of its own, run before
training (`ssmforge prepare CONFIG`); a training job prepares missing shards itself only for small data.
A prepare split over several jobs (a SLURM array) is data_pipeline.parts.
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
from contextlib import contextmanager
from itertools import islice, takewhile
from pathlib import Path

import numpy as np

from ssmforge.errors import DataError

from .manifest import MANIFEST_FILE, Manifest, SplitStats, find_manifest, fingerprint, is_remote, read_manifest
from .shards import ShardWriter
from .sources import SkipCounter, TokenBudget, expand_paths, mixed_documents
from .tokenizer import (SENTENCEPIECE_TRAINER_VERSION, ByteTokenizer, load_tokenizer, require_lossless,
                        train_sentencepiece)

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = ".tokenizer-config"  # fingerprint of the settings a trained tokenizer.model came from
PARTS_DIR = "parts"  # a prepare in parts (data_pipeline.parts) keeps its records and held ends here
BATCH_DOCUMENTS = 256  # documents per task sent to a tokenizer process, and the block a part takes
LOG_EVERY_S = 60.0  # progress lines when stderr is not a terminal
# A training job prepares missing shards itself only for data this small (well inside the collective timeout
# that the other ranks wait under); anything larger is `ssmforge prepare CONFIG`, run first.
IN_JOB_LOCAL_BYTES = 64 << 20
IN_JOB_SYNTHETIC_DOCUMENTS = 100_000


def data_fingerprint(config) -> str:
    """Everything that changes the shards: sources, tokenizer, seq_len, split and seed."""
    tokenizer = dataclasses.asdict(config.tokenizer)
    del tokenizer["allow_lossy"]  # a permission, not a setting: the shards are the same either way
    if tokenizer["kind"] == "sentencepiece" and not tokenizer["path"]:
        tokenizer["trainer_version"] = SENTENCEPIECE_TRAINER_VERSION  # shards of an older trainer are other data
    return fingerprint({
        "sources": [_source_settings(s) for s in config.data.sources],
        "tokenizer": tokenizer,
        "seq_len": config.data.seq_len,
        "val_fraction": config.data.val_fraction,
        "invalid_utf8": config.data.invalid_utf8,
        "seed": config.seed,
    })


def _source_settings(source) -> dict:
    settings = dataclasses.asdict(source)
    if settings["max_tokens"] is None:  # data prepared before budgets existed keeps its fingerprint
        del settings["max_tokens"]
    return settings


def tokenizer_fingerprint(config) -> str:
    """What a SentencePiece model trained here depends on: its settings and the documents it learns from (the
    start of the mixture, which token budgets do not cut)."""
    tokenizer = dataclasses.asdict(config.tokenizer)
    del tokenizer["allow_lossy"]
    sources = [{k: v for k, v in dataclasses.asdict(s).items() if k != "max_tokens"} for s in config.data.sources]
    return fingerprint({"tokenizer": tokenizer, "trainer_version": SENTENCEPIECE_TRAINER_VERSION, "sources": sources,
                        "invalid_utf8": config.data.invalid_utf8, "seed": config.seed})


def cores() -> int:
    """CPUs this process may run on (a SLURM allocation's, not the whole node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# -- tokenizer processes ---------------------------------------------------------------------------
_worker = {}


def _init_worker(kind: str, path: str | None, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool is the parallelism
    tokenizer = load_tokenizer(kind, path)
    _worker.update(tokenizer=tokenizer, eos=tokenizer.eos_id, dtype=np.dtype(dtype))


def _join(documents: list[np.ndarray], eos: int, dtype: np.dtype) -> np.ndarray:
    """The documents' ids, each followed by EOS, as one array of the shard dtype."""
    if not documents:
        return np.empty(0, dtype)
    ends = np.cumsum([len(d) for d in documents])
    return np.insert(np.concatenate(documents).astype(dtype, copy=False), ends, eos)


def _tokenize(texts: list[str], to_val: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train stream, val stream, tokens per document): the EOS-joined ids of the documents of each split, in
    the shard dtype, and each document's token count, EOS included."""
    eos, dtype = _worker["eos"], _worker["dtype"]
    ids = _worker["tokenizer"].encode_batch(texts)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 1
    train = _join([d for d, v in zip(ids, to_val) if not v], eos, dtype)
    val = _join([d for d, v in zip(ids, to_val) if v], eos, dtype)
    return train, val, lengths


def _tokenized(pool, blocks, window: int):
    """(block, result of _tokenize) in input order, with at most `window` blocks in flight so that an endless
    hub stream never piles up in memory."""
    inflight = deque()
    for block in blocks:
        start, documents, to_val = block
        inflight.append((block, pool.apply_async(_tokenize, ([text for _, text, _ in documents], to_val))))
        if len(inflight) >= window:
            done, result = inflight.popleft()
            yield done, result.get()
    while inflight:
        done, result = inflight.popleft()
        yield done, result.get()


def _blocks(documents, rng: np.random.Generator, val_fraction: float, part: int, parts: int):
    """(index of its first document in the stream, documents, which go to validation) for the blocks of
    BATCH_DOCUMENTS documents this part takes: every parts-th, starting at the part-th. The split draw is made
    for every document of every block, in order: one seeded stream whatever the number of parts."""
    start = 0
    for index, block in enumerate(iter(lambda: list(islice(documents, BATCH_DOCUMENTS)), [])):
        to_val = rng.random(len(block)) < val_fraction
        if index % parts == part:
            yield start, block, to_val
        start += len(block)


# -- packing ---------------------------------------------------------------------------------------
class SplitPacker:
    """One split's EOS-joined token stream, cut into samples of seq_len + 1 and written to a ShardWriter.

    A single job writes every full sample and drops what is left; a part (`hold`) keeps at least one sample's
    worth unwritten (returned by finish, and `held_documents`: those that reach into it) for the merge, which
    takes the tokens a single job would drop out of the parts' ends."""

    def __init__(self, writer: ShardWriter, seq_len: int, dtype: np.dtype, track_surprisal: bool, hold: bool):
        self.writer, self.width, self.dtype = writer, seq_len + 1, dtype
        self.keep = self.width if hold else 0
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.held_documents: deque | None = deque() if hold else None  # [stream index, tokens still pending]
        self.stats = SplitStats(surprisal_nats=0.0 if track_surprisal else None)

    def add(self, stream: np.ndarray, indices: np.ndarray, lengths: np.ndarray, surprisal: float | None) -> None:
        """Append documents (their EOS-joined tokens, stream indices and lengths) and write the samples they fill."""
        self.stats.documents += len(lengths)
        if self.stats.surprisal_nats is not None:
            self.stats.surprisal_nats += surprisal
        if self.held_documents is not None:
            self.held_documents.extend([i, n] for i, n in zip(indices.tolist(), lengths.tolist()))
        self.pending.append(stream)
        self.pending_tokens += len(stream)
        samples = (self.pending_tokens - self.keep) // self.width
        if samples <= 0:
            return
        stream = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        cut = samples * self.width
        self.writer.write(stream[:cut].reshape(samples, self.width))
        self.stats.samples += samples
        self.stats.tokens += cut
        self.pending, self.pending_tokens = [stream[cut:]], len(stream) - cut
        while self.held_documents is not None and cut:
            first = self.held_documents[0]
            if first[1] <= cut:
                cut -= first[1]
                self.held_documents.popleft()
            else:
                first[1] -= cut
                cut = 0

    def finish(self) -> np.ndarray:
        """Write the index; return the tokens not written (a single job's dropped tail, a part's held end)."""
        self.writer.finish()
        return np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)


@dataclasses.dataclass
class Packed:
    """What _pack wrote: per split the stats and the tokens left unwritten; per source documents and tokens."""

    stats: dict[str, SplitStats]
    held: dict[str, np.ndarray]
    held_documents: dict[str, list[list[int]]]
    source_documents: list[int]
    source_tokens: list[int]
    skipped: SkipCounter
    seconds: float


def _pack(config, kind: str, tokenizer_path: str | None, dtype: np.dtype, out: dict[str, Path],
          part: int = 0, parts: int = 1, workers: int | None = None, upload=None, hold: bool = False) -> Packed:
    """Stream the sources through the tokenizer pool into one SplitPacker per split writing into out[split]; with
    `hold`, as a part of a prepare in parts (see SplitPacker)."""
    sources = config.data.sources
    skipped = SkipCounter()
    budget = TokenBudget(sources)
    documents = mixed_documents(sources, config.seed, config.data.invalid_utf8, skipped)
    blocks = _blocks(documents, np.random.default_rng(config.seed), config.data.val_fraction, part, parts)
    track_surprisal = all(s.kind == "synthetic" for s in sources)
    workers = workers or config.data.tokenize_workers or cores()
    progress = Progress(f"prepare part {part} of {parts}" if parts > 1 else "prepare")
    # forkserver: workers come from a clean process, never forked from one that runs gloo/NCCL threads
    with multiprocessing.get_context("forkserver").Pool(workers, _init_worker, (kind, tokenizer_path, dtype.name)) as pool:
        packers = {
            name: SplitPacker(ShardWriter(out[name], dtype, config.data.seq_len + 1, submit=pool.apply_async,
                                          on_file=upload and (lambda f, name=name: upload(name, f)),
                                          max_inflight=workers),
                              config.data.seq_len, dtype, track_surprisal, hold)
            for name in SPLITS
        }
        for (start, block, to_val), (train, val, lengths) in _tokenized(pool, blocks, window=2 * workers):
            n = budget.admit_batch([source for source, _, _ in block], lengths)
            if n < len(block):  # a budget ended the stream inside this block
                train = train[:int(lengths[:n][~to_val[:n]].sum())]
                val = val[:int(lengths[:n][to_val[:n]].sum())]
            for name, stream, flag in (("train", train, False), ("val", val, True)):
                chosen = np.flatnonzero(to_val[:n] == flag)
                surprisal = sum(block[i][2] for i in chosen) if track_surprisal else None
                packers[name].add(stream, start + chosen, lengths[chosen], surprisal)
            progress(int(lengths[:n].sum()))
            if budget.ended:
                break
        held = {name: packer.finish() for name, packer in packers.items()}
    progress.close()
    return Packed(stats={name: p.stats for name, p in packers.items()}, held=held,
                  held_documents={name: list(p.held_documents or []) for name, p in packers.items()},
                  source_documents=budget.documents, source_tokens=budget.tokens, skipped=skipped,
                  seconds=progress.elapsed())


class Progress:
    """Tokens done and tokens/s: a tqdm bar on a terminal, else a log line every LOG_EVERY_S seconds."""

    def __init__(self, what: str):
        self.what, self.tokens, self.start, self.logged = what, 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(unit="tok", unit_scale=True, desc=what)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(tokens)
        elif time.perf_counter() - self.logged >= LOG_EVERY_S:
            self.logged = time.perf_counter()
            log.info("%s: %.1fM tokens, %.2fM tokens/s", self.what, self.tokens / 1e6,
                     self.tokens / max(self.elapsed(), 1e-9) / 1e6)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the tokenizer ---------------------------------------------------------------------------------
def _resolve_tokenizer(config, work_dir: Path, train: bool = True):
    """The tokenizer of the config and its file: byte (no file), a given file (refused if it would change the
    documents, unless tokenizer.allow_lossy), or a SentencePiece model trained here (lossless by
    construction) on the first tokenizer.train_documents documents of the mixture (max_documents applies;
    max_tokens cannot, it counts this tokenizer's tokens). A model trained before from the same settings
    (work_dir/tokenizer.model beside its .tokenizer-config) is reused; with train=False there must be one."""
    tok = config.tokenizer
    if tok.kind == "byte":
        return ByteTokenizer(), None
    if tok.path:
        tokenizer = load_tokenizer(tok.kind, tok.path)
        if not tok.allow_lossy:
            require_lossless(tokenizer, tok.path)
        return tokenizer, tok.path
    path = trained_tokenizer(config, work_dir)
    if path is not None:
        return load_tokenizer("sentencepiece", path), str(path)
    if not train:
        raise no_trained_tokenizer(work_dir)
    path, settings = work_dir / TOKENIZER_FILE, work_dir / TOKENIZER_CONFIG_FILE
    sample = (text for _, text, _ in islice(
        mixed_documents(config.data.sources, config.seed, config.data.invalid_utf8, SkipCounter()),
        tok.train_documents))
    log.info("training a %s SentencePiece tokenizer (vocab %d) on up to %d documents", tok.model_type,
             tok.vocab_size, tok.train_documents)
    settings.unlink(missing_ok=True)
    try:
        tokenizer = train_sentencepiece(sample, path, tok.vocab_size, tok.model_type)
    except BaseException:
        path.unlink(missing_ok=True)  # half a model, or none: nothing a later run could use
        raise
    settings.write_text(tokenizer_fingerprint(config) + "\n")
    return tokenizer, str(path)


def trained_tokenizer(config, work_dir: Path) -> Path | None:
    """The SentencePiece model trained for this config's settings in work_dir (beside its .tokenizer-config), or
    None when there is none."""
    path, settings = work_dir / TOKENIZER_FILE, work_dir / TOKENIZER_CONFIG_FILE
    if path.is_file() and settings.is_file() and settings.read_text().strip() == tokenizer_fingerprint(config):
        return path
    return None


def no_trained_tokenizer(work_dir: Path) -> DataError:
    return DataError(f"{work_dir}: no trained tokenizer for this config; the parts of a prepare share one, "
                     f"trained once before them: run `ssmforge prepare CONFIG --train-tokenizer` first")


def _checked_tokenizer(config, work_dir: Path, train: bool = True):
    """(tokenizer, its file or None, kind, shard dtype), the tokenizer checked against the model."""
    tokenizer, path = _resolve_tokenizer(config, work_dir, train)
    if tokenizer.eos_id is None or tokenizer.eos_id < 0:
        raise DataError(f"{path}: the tokenizer has no EOS id, needed between documents")
    check_vocab(tokenizer.vocab_size, config)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    kind = "byte" if isinstance(tokenizer, ByteTokenizer) else config.tokenizer.kind
    return tokenizer, path, kind, dtype


def check_vocab(ids: int, config) -> None:
    """A model needs an embedding row for each of the tokenizer's `ids`."""
    if ids > config.model.padded_vocab_size:
        raise DataError(f"the tokenizer has {ids} ids but model.vocab_size is {config.model.vocab_size}; "
                        f"set model.vocab_size={ids}")


def _tokenizer_record(tokenizer, kind: str, path: str | None) -> dict:
    """The manifest's tokenizer record. `document_prefix`: the token every document follows in the stream
    (_join ends each document with EOS, so the next one starts after it); evaluation conditions on it."""
    return {"kind": kind, "file": TOKENIZER_FILE if path else None, "sha256": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "bos_id": tokenizer.bos_id, "document_prefix": "eos"}


# -- the stage -------------------------------------------------------------------------------------
def _destination(config) -> tuple[str, bool, Path]:
    """(data.shard_dir, whether it is remote, the local folder written: the shard folder or a staging one)."""
    out = config.data.shard_dir
    remote = is_remote(out)
    return out, remote, Path(config.data.cache_dir) / "prepare" if remote else Path(out)


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
    ours = (*SPLITS, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, PARTS_DIR, ".preparing")
    if any(name not in ours for name in leftovers):
        raise DataError(f"{out}: folder is not empty and holds no ssmforge manifest; refusing to write into it")
    return None


def missing_folders(path: Path) -> list[Path]:
    """path and those of its parents that do not exist yet, deepest first: what a mkdir(parents=True) creates."""
    return list(takewhile(lambda p: not os.path.lexists(p), (path, *path.parents)))


@contextmanager
def undone_on_error(folders: list[Path], created: list[Path], done: Path | None = None):
    """When the block raises (a bad document, an interrupt) before the file `done` marks the output complete:
    remove `folders`, the half-written output, then each folder of `created` (those this command made, deepest
    first) that is left empty. A tokenizer trained for this config stays in the shard folder (and keeps it),
    since the next run takes it up."""
    try:
        yield
    except BaseException:
        for folder in folders if done is None or not done.exists() else []:
            shutil.rmtree(folder, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (a tokenizer, another part's shards), or gone
                pass
        raise


def prepare(config, workers: int | None = None) -> Manifest:
    """Build the shards for `config.data` into `config.data.shard_dir` in this job; idempotent (see module doc).
    A prepare that fails leaves no shards behind, nor a shard folder it created (but for a trained tokenizer)."""
    out, remote, local = _destination(config)
    created = missing_folders(local)
    local.mkdir(parents=True, exist_ok=True)
    expected = data_fingerprint(config)
    existing = _check_destination(out, local, expected)
    if existing is not None:
        log.info("%s already holds this dataset (%d train samples); nothing to do", out,
                 existing.splits["train"].samples)
        return existing
    for name in (*SPLITS, PARTS_DIR):  # a run that died half-way left these; they are ours (no manifest yet)
        shutil.rmtree(local / name, ignore_errors=True)
    with undone_on_error([local / name for name in SPLITS], created, done=local / MANIFEST_FILE):
        return _prepare(config, out, remote, local, expected, workers)


def _prepare(config, out: str, remote: bool, local: Path, expected: str, workers: int | None) -> Manifest:
    """prepare's work once the destination is clear: the tokenizer, the shards, the manifest."""
    tokenizer, tokenizer_path, kind, dtype = _checked_tokenizer(config, local)
    upload = None
    if remote:
        from streaming.base.storage import CloudUploader

        uploaders = {name: CloudUploader.get((str(local / name), f"{out.rstrip('/')}/{name}"), exist_ok=True)
                     for name in SPLITS}  # each file is removed here once uploaded
        upload = lambda split, name: uploaders[split].upload_file(name)  # noqa: E731
    packed = _pack(config, kind, tokenizer_path, dtype, {name: local / name for name in SPLITS}, workers=workers,
                   upload=upload)
    stats = packed.stats
    for name in SPLITS:
        stats[name].dropped_tail_tokens = len(packed.held[name])
    total_tokens = sum(packed.source_tokens)
    if stats["train"].samples == 0:
        raise DataError(f"{out}: the sources gave {total_tokens} tokens, fewer than one training sample of "
                        f"{config.data.seq_len + 1}; add data or lower data.seq_len")
    manifest = Manifest(
        fingerprint=expected, seq_len=config.data.seq_len, token_dtype=dtype.name, seed=config.seed,
        tokenizer=_tokenizer_record(tokenizer, kind, tokenizer_path),
        sources=_source_records(config, packed.source_documents, packed.source_tokens),
        splits=stats, skipped=dataclasses.asdict(packed.skipped),
    )
    _finish(manifest, local, out, remote, tokenizer_path)
    log.info("prepared %s: %d documents, %d tokens in %.1fs (%.2fM tokens/s); train %d samples, val %d samples%s",
             out, sum(packed.source_documents), total_tokens, packed.seconds,
             total_tokens / max(packed.seconds, 1e-9) / 1e6, stats["train"].samples, stats["val"].samples,
             f"; skipped {packed.skipped.invalid_utf8} documents with invalid UTF-8" if packed.skipped.invalid_utf8
             else "")
    return manifest


def _source_records(config, documents: list[int], tokens: list[int]) -> list[dict]:
    """Each source's settings and what it gave: documents, and tokens (EOS included, before packing)."""
    return [{**dataclasses.asdict(s), "documents": d, "tokens": t}
            for s, d, t in zip(config.data.sources, documents, tokens)]


def _finish(manifest: Manifest, local: Path, out: str, remote: bool, tokenizer_path: str | None) -> None:
    """Put the tokenizer beside the shards and write the manifest, last: its presence marks the data complete."""
    if tokenizer_path and Path(tokenizer_path) != local / TOKENIZER_FILE:
        shutil.copyfile(tokenizer_path, local / TOKENIZER_FILE)
    manifest.write(local)
    if remote:
        _upload(local, out, [TOKENIZER_FILE] * bool(tokenizer_path) + [MANIFEST_FILE])


def _upload(local: Path, remote: str, names: list[str]) -> None:
    from streaming.base.storage import CloudUploader

    uploader = CloudUploader.get((str(local), remote), exist_ok=True)
    for name in names:
        uploader.upload_file(name)


def prepare_tokenizer(config) -> str | None:
    """Train the SentencePiece tokenizer of the config into the shard folder, once (a model trained from the same
    settings is kept); return its path, or None when the config trains none (byte, or a tokenizer.path)."""
    out, remote, local = _destination(config)
    created = missing_folders(local)
    existing = _check_destination(out, local, data_fingerprint(config))
    if config.tokenizer.kind == "byte" or config.tokenizer.path:
        return None
    if existing is not None and existing.tokenizer["file"]:
        return str(local / existing.tokenizer["file"]) if not remote else f"{out.rstrip('/')}/{TOKENIZER_FILE}"
    local.mkdir(parents=True, exist_ok=True)
    with undone_on_error([], created):
        _, path, _, _ = _checked_tokenizer(config, local)
    return path


# -- inside a training job -------------------------------------------------------------------------
def prepare_in_job(config, command: str = "ssmforge prepare CONFIG", local_bytes: int | None = None) -> bool:
    """Whether a training job should prepare the shards itself before it trains. False when they are there
    (raises DataError if they were prepared from another config). When they are missing: True for small data
    only (the embedded synthetic corpus up to IN_JOB_SYNTHETIC_DOCUMENTS documents, local files totalling up to
    IN_JOB_LOCAL_BYTES); anything else raises DataError telling to run `command` first, since preparing it
    would hold every other rank of the job waiting. Reads only the config and the shard folder, so every rank
    decides the same, before anything starts. A remote shard folder is never prepared here (False).
    `local_bytes`: the size of the local sources' files where the caller has summed it already."""
    if is_remote(config.data.shard_dir) or shards_ready(config, command):
        return False
    large = too_large_for_a_training_job(config, local_bytes)
    if large:
        raise DataError(f"{config.data.shard_dir} holds no prepared shards, and {' and '.join(large)} "
                        f"{'are' if len(large) > 1 else 'is'} too large to prepare inside a training job; run "
                        f"`{command}` first (`ssmforge submit` runs it as a job of its own before training)")
    return True


def needs_preparation_job(config) -> bool:
    """Whether `ssmforge submit` must run `ssmforge prepare` as a job of its own before the training job: the
    shards are missing from a local (shared) shard folder and too large for the training job to prepare."""
    return (not is_remote(config.data.shard_dir) and not shards_ready(config)
            and bool(too_large_for_a_training_job(config)))


def shards_ready(config, command: str = "ssmforge prepare CONFIG") -> bool:
    """Whether data.shard_dir holds the shards of this config; DataError when it holds another config's."""
    out = config.data.shard_dir
    existing = read_manifest(out)
    if existing is None:
        return False
    expected = data_fingerprint(config)
    if existing.fingerprint != expected:
        raise DataError(f"{out}: already holds data prepared from a different config (fingerprint "
                        f"{existing.fingerprint[:12]}, this config {expected[:12]}); choose another "
                        f"data.shard_dir, remove that folder, or run `{command}` for this config elsewhere")
    return True


def too_large_for_a_training_job(config, local_bytes: int | None = None) -> list[str]:
    """The sources (described for a message) too large for a training job to prepare while its ranks wait.
    `local_bytes`: the local sources' total size, if known (else their files are listed and sized here)."""
    large = []
    if local_bytes is None:
        local_bytes = sum(path.stat().st_size for source in config.data.sources if source.kind == "local"
                          for path in expand_paths(list(source.paths)))
    for i, source in enumerate(config.data.sources):
        if source.kind == "hub":
            large.append(f"data.sources.{i} (hub dataset {source.name})")
        elif source.kind == "synthetic" and (source.max_documents is None
                                             or source.max_documents > IN_JOB_SYNTHETIC_DOCUMENTS):
            large.append(f"data.sources.{i} (synthetic, {source.max_documents or 'unbounded'} documents, more than "
                         f"{IN_JOB_SYNTHETIC_DOCUMENTS:,})")
    if local_bytes > IN_JOB_LOCAL_BYTES:
        large.append(f"the local files ({local_bytes / 2**20:.0f} MiB, more than {IN_JOB_LOCAL_BYTES >> 20} MiB)")
    return large
