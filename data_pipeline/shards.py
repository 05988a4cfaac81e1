"""MDS shards of fixed-width token samples, written whole-shard at a time, and merged indexes.

The files are mosaicml-streaming's MDS format (version 2) as its MDSWriter writes them for
`columns={"tokens": "ndarray:<dtype>:<width>"}, compression="zstd", hashes=["xxh64"]`, byte for byte (a test
holds this writer to MDSWriter's output): each shard holds a sample count, an offset table, the writer's config
as JSON and the samples, and is zstd-compressed (level 3) with the xxh64 of both forms in `index.json`. Building
a shard from a (samples, width) array in one piece instead of sample by sample makes packing cost next to
nothing, and the shard can be compressed in another process (`ShardWriter(submit=...)`).

A merged split (`merge_indexes`) lists the shards of several folders in one `index.json`, each basename
prefixed by its folder, which is the layout streaming's `merge_index` produces and StreamingDataset reads.
"""
from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

INDEX_FILE = "index.json"
SHARD_BYTES = 1 << 26  # streaming's default size_limit
ZSTD_LEVEL = 3  # what streaming's "zstd" means


def write_json_atomic(path: Path, obj, **kwargs) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, **kwargs))
    os.replace(tmp, path)


def write_shard(raw: bytes, directory: str, raw_basename: str) -> tuple[dict, dict]:
    """Compress one encoded shard, write it as `raw_basename`.zstd, and return (raw_data, zip_data) as the index
    records them. A plain function of picklable arguments, so that a process pool can run it."""
    import xxhash
    import zstd

    data = zstd.compress(raw, ZSTD_LEVEL)
    zip_basename = f"{raw_basename}.zstd"
    with open(Path(directory) / zip_basename, "wb") as f:
        f.write(data)
    return ({"basename": raw_basename, "bytes": len(raw), "hashes": {"xxh64": xxhash.xxh64(raw).hexdigest()}},
            {"basename": zip_basename, "bytes": len(data), "hashes": {"xxh64": xxhash.xxh64(data).hexdigest()}})


class ShardWriter:
    """Writes (n, width) arrays of samples into MDS shards under `directory`, then its `index.json`.

    `submit(fn, args)` runs `write_shard` elsewhere and returns a future with `.get()` and `.ready()` (a
    multiprocessing pool's apply_async), at most `max_inflight` at a time; without it, shards are written here.
    The index keeps the shards in the order they were cut. `on_file(basename)` is called for every file once
    it is complete (an uploader, for a remote)."""

    def __init__(self, directory: str | Path, dtype: np.dtype, width: int, size_limit: int = SHARD_BYTES,
                 submit: Callable | None = None, on_file: Callable[[str], None] | None = None,
                 max_inflight: int = 4):
        self.directory, self.dtype, self.width = Path(directory), np.dtype(dtype), width
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sample_bytes = width * self.dtype.itemsize
        self.config = {"version": 2, "format": "mds", "compression": "zstd", "hashes": ["xxh64"],
                       "size_limit": size_limit, "column_names": ["tokens"],
                       "column_encodings": [f"ndarray:{self.dtype.name}:{width}"], "column_sizes": [self.sample_bytes]}
        self.config_bytes = json.dumps(self.config, sort_keys=True).encode()
        # MDSWriter starts a new shard when the next sample (plus its 4-byte offset) would pass size_limit
        self.per_shard = max(1, (size_limit - 8 - len(self.config_bytes)) // (self.sample_bytes + 4))
        self.submit, self.on_file, self.max_inflight = submit, on_file, max_inflight
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.records: list[dict] = []  # index entries of the shards written, in order
        self.inflight: deque = deque()  # (samples, future of write_shard), oldest first
        self.samples = 0

    def write(self, samples: np.ndarray) -> None:
        """Append samples, (n, width) of the writer's dtype; full shards are written as they fill."""
        if not len(samples):
            return
        self.pending.append(samples)
        self.pending_rows += len(samples)
        self.samples += len(samples)
        if self.pending_rows >= self.per_shard:
            rows = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
            full = len(rows) // self.per_shard * self.per_shard
            for start in range(0, full, self.per_shard):
                self._flush(rows[start:start + self.per_shard])
            self.pending = [rows[full:]] if full < len(rows) else []
            self.pending_rows = len(rows) - full

    def encode(self, rows: np.ndarray) -> bytes:
        """One shard file's uncompressed bytes: sample count, offsets, the writer's config, the samples."""
        n = len(rows)
        header = 4 + 4 * (n + 1) + len(self.config_bytes)
        offsets = header + np.arange(n + 1, dtype=np.int64) * self.sample_bytes
        return b"".join((np.uint32(n).tobytes(), offsets.astype(np.uint32).tobytes(), self.config_bytes,
                         np.ascontiguousarray(rows, dtype=self.dtype).tobytes()))

    def _flush(self, rows: np.ndarray) -> None:
        n = len(rows)
        args = (self.encode(rows), str(self.directory), f"shard.{len(self.records) + len(self.inflight):05}.mds")
        if self.submit is None:
            self._done(n, write_shard(*args))
            return
        self.inflight.append((n, self.submit(write_shard, args)))
        while self.inflight and (len(self.inflight) > self.max_inflight or self.inflight[0][1].ready()):
            n, future = self.inflight.popleft()
            self._done(n, future.get())

    def _done(self, n: int, result: tuple[dict, dict]) -> None:
        raw_data, zip_data = result
        self.records.append({"samples": n, "raw_data": raw_data, "zip_data": zip_data, **self.config})
        if self.on_file:
            self.on_file(zip_data["basename"])

    def finish(self) -> int:
        """Write what is left and the index; return the number of samples written."""
        if self.pending_rows:
            self._flush(np.concatenate(self.pending))
        self.pending, self.pending_rows = [], 0
        while self.inflight:
            n, future = self.inflight.popleft()
            self._done(n, future.get())
        write_json_atomic(self.directory / INDEX_FILE, {"version": 2, "shards": self.records}, sort_keys=True)
        if self.on_file:
            self.on_file(INDEX_FILE)
        return self.samples


def merge_indexes(split_dir: Path, folders: list[str]) -> int:
    """Write split_dir/index.json listing the shards of split_dir/<folder>/index.json for each folder, in order,
    with basenames relative to split_dir; return the number of samples."""
    shards = []
    for folder in folders:
        for shard in json.loads((split_dir / folder / INDEX_FILE).read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{folder}/{shard[key]['basename']}"
            shards.append(shard)
    write_json_atomic(split_dir / INDEX_FILE, {"version": 2, "shards": shards}, sort_keys=True)
    return sum(shard["samples"] for shard in shards)

