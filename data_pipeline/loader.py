"""Streaming loader over prepared MDS shards: deterministic shuffle, per-rank partition, exact resume.

Each rank reads its part of the samples through mosaicml-streaming's StreamingDataset; the position
(epoch, samples seen) is in `loader.state_dict()` and restored with `load_state_dict`, so a resumed
run sees exactly the batches an uninterrupted run would have seen. Shards are checked against the
sizes and xxh64 hashes of their index before the first batch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from ssmforge.errors import DataError
from ssmforge.launcher_env import export_launcher_env

from .manifest import Manifest, find_manifest, is_remote


def verify_shards(split_dir: Path) -> int:
    """Check every shard of a local split against its index (size and xxh64); return the sample count."""
    import xxhash

    index_path = split_dir / "index.json"
    try:
        index = json.loads(index_path.read_text())
        shards = index["shards"]
    except FileNotFoundError:
        raise DataError(f"{index_path}: missing; run `ssmforge prepare` for this config first") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{index_path}: not a valid MDS index ({e})") from None
    for shard in shards:
        for kind in ("zip_data", "raw_data"):
            info = shard.get(kind)
            if not info:
                continue
            path = split_dir / info["basename"]
            if not path.exists():
                if kind == "raw_data" and shard.get("zip_data"):
                    continue  # decompressed on first use
                raise DataError(f"{path}: shard missing")
            data = path.read_bytes()
            if len(data) != info["bytes"]:
                raise DataError(f"{path}: shard is truncated or damaged ({len(data)} bytes, index says "
                                f"{info['bytes']})")
            want = info.get("hashes", {}).get("xxh64")
            if want and xxhash.xxh64(data).hexdigest() != want:
                raise DataError(f"{path}: shard content does not match its xxh64 hash (corrupted)")
    return sum(shard["samples"] for shard in shards)


# where Linux shows POSIX shared memory; streaming names its segments "<prefix:06>_<name>" there
SHARED_MEMORY_DIR = Path("/dev/shm")


def _mapped_shared_memory() -> set[str]:
    """Paths under SHARED_MEMORY_DIR that a process this user can see has mapped (read from /proc)."""
    # a maps line: address perms offset dev inode path
    path = re.compile(rf" ({re.escape(str(SHARED_MEMORY_DIR))}/.+)$", re.MULTILINE)
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(path.findall(maps.read_text()))
        except OSError:  # a process that ended, or another user's
            continue
    return mapped


def remove_stale_shared_memory() -> list[str]:
    """Unlink the streaming shared memory that no live process maps (what a killed run leaves, which makes
    a later run on the node fail with "Reused local directory"); return the names removed.

    A live StreamingDataset maps every segment it holds until its process exits; streaming's own
    clean_stale_shared_memory unlinks the segments of every prefix from 0 up to the first unused one, a
    running job's included. Other users' processes are not seen, but their segments are not ours to unlink."""
    from streaming.base.constant import SHM_TO_CLEAN

    if not SHARED_MEMORY_DIR.is_dir():
        return []  # macOS and Windows do not list their shared memory: nothing to clean
    pattern = re.compile(rf"\d{{6,}}_({'|'.join(SHM_TO_CLEAN)})")
    # listed before the processes are read: a segment that appears in between is not a candidate
    candidates = [path for path in SHARED_MEMORY_DIR.iterdir() if pattern.fullmatch(path.name)]
    mapped = _mapped_shared_memory()
    removed = []
    for path in candidates:
        if str(path) not in mapped:
            try:
                path.unlink()
                removed.append(path.name)
            except (FileNotFoundError, PermissionError):  # gone meanwhile, or another user's
                pass
    return removed


def _remove_stale_shared_memory_on_local_rank_0() -> None:
    """remove_stale_shared_memory on local rank 0 while the node's other ranks wait, so none of them picks
    its shared memory prefix from a listing that is about to change."""
    import torch.distributed as dist
    from streaming.base.distributed import get_local_rank, maybe_init_dist

    own_group = maybe_init_dist()  # as streaming does: the barrier needs a group
    if get_local_rank() == 0:
        remove_stale_shared_memory()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if own_group:
        dist.destroy_process_group()


def _collate(samples: list[dict]) -> torch.Tensor:
    """(batch, seq_len + 1) int64 token ids."""
    return torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))


def open_manifest(shard_dir: str, cache_dir: str) -> Manifest:
    """The manifest of prepared shards (downloaded first for a remote shard_dir)."""
    manifest = find_manifest(shard_dir, Path(cache_dir) / "manifest")
    if manifest is None:
        raise DataError(f"{shard_dir}: no manifest.json; run `ssmforge prepare CONFIG` first")
    return manifest


def build_loader(shard_dir: str, split: str, batch_size: int, seed: int, cache_dir: str, num_workers: int = 0,
                 shuffle: bool = True, vocab_size: int | None = None, num_canonical_nodes: int = 1):
    """A StreamingDataLoader yielding (batch, seq_len + 1) int64 tensors for this rank.

    batch_size is per rank. Remote shards are cached under cache_dir/split. With vocab_size, a sample
    holding a token id outside [0, vocab_size) raises DataError naming its shard before it is batched.

    The order is elastic: streaming shuffles the samples into one global sequence that depends on the seed,
    the epoch and num_canonical_nodes only, and the i-th batch of every rank together is the i-th slice of
    batch_size x world size samples of it. So k consecutive such slices (an optimizer step of a fixed global
    batch) hold the same samples on 1, 2 or 4 ranks, whatever the accumulation, as long as
    num_canonical_nodes stays the same and the node count divides it or is a multiple of it. (Within an
    epoch: the few samples left at its end, dropped as an incomplete batch, depend on the rank count.)
    """
    from streaming import StreamingDataLoader

    from .token_dataset import TokenDataset

    export_launcher_env()  # streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment
    _remove_stale_shared_memory_on_local_rank_0()
    if is_remote(shard_dir):
        remote, local = f"{shard_dir.rstrip('/')}/{split}", str(Path(cache_dir) / split)
    else:
        remote, local = None, str(Path(shard_dir) / split)
        verify_shards(Path(local))
    options = dict(remote=remote, local=local, shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size,
                   validate_hash="xxh64" if remote else None, num_canonical_nodes=num_canonical_nodes)
    dataset = TokenDataset(vocab_size=vocab_size, **options)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                               drop_last=True, persistent_workers=False)
