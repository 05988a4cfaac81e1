"""Streaming loader over prepared MDS shards: deterministic shuffle, per-rank partition, exact resume.

Each rank reads its part of the samples through mosaicml-streaming's StreamingDataset; the position
(epoch, samples seen) is in `loader.state_dict()` and restored with `load_state_dict`, so a resumed
run sees exactly the batches an uninterrupted run would have seen. Shards are checked against the
sizes and xxh64 hashes of their index before the first batch.
"""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import torch

from ssmforge.errors import DataError
from ssmforge.launcher_env import export_launcher_env

from .manifest import Manifest, find_manifest, is_remote
from .shared_memory import registering_shared_memory


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
                 shuffle: bool = True, vocab_size: int | None = None, num_canonical_nodes: int = 1,
                 replication: int = 1):
    """A StreamingDataLoader yielding (batch, seq_len + 1) int64 tensors for this rank.

    batch_size is per rank. Remote shards are cached under cache_dir/split. With vocab_size, a sample
    holding a token id outside [0, vocab_size) raises DataError naming its shard before it is batched.

    The order is elastic: streaming shuffles the samples into one global sequence that depends on the seed,
    the epoch and num_canonical_nodes only, and the i-th batch of every rank together is the i-th slice of
    batch_size x world size samples of it. So k consecutive such slices (an optimizer step of a fixed global
    batch) hold the same samples on 1, 2 or 4 ranks, whatever the accumulation, as long as
    num_canonical_nodes stays the same and the node count divides it or is a multiple of it. (Within an
    epoch: the few samples left at its end, dropped as an incomplete batch, depend on the rank count.)

    replication: consecutive ranks that receive the same samples (a context-parallel group, which splits each
    sequence between its ranks); the partition is then that of world size / replication ranks.
    """
    from streaming import StreamingDataLoader

    from .token_dataset import TokenDataset

    export_launcher_env()  # streaming reads RANK / WORLD_SIZE / LOCAL_WORLD_SIZE from the environment
    if is_remote(shard_dir):
        remote, local = f"{shard_dir.rstrip('/')}/{split}", str(Path(cache_dir) / split)
    else:
        remote, local = None, str(Path(shard_dir) / split)
        verify_shards(Path(local))
    options = dict(remote=remote, local=local, shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size,
                   validate_hash="xxh64" if remote else None, num_canonical_nodes=num_canonical_nodes,
                   replication=replication if replication > 1 else None)
    with registering_shared_memory():
        dataset = TokenDataset(vocab_size=vocab_size, **options)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                               drop_last=True, persistent_workers=False, worker_init_fn=_init_worker)


def _init_worker(worker_id: int) -> None:
    _leave_stop_signals_to_the_trainer(worker_id)
    close_inherited_network_sockets()


def close_inherited_network_sockets() -> None:
    """A forked worker inherits its training process's TCP sockets (the process group's connections to the other
    ranks, the rendezvous store's). Kept open, they hold a killed training process's connections up until its
    workers notice they are orphaned (every 5 s), and the other ranks only see the rank lost then. A worker needs
    none of them (a remote source opens its own): the worker's copies are closed; Unix sockets and pipes, the
    worker's queues, are kept. Linux only (/proc/self/fd); elsewhere nothing is closed."""
    try:
        descriptors = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in descriptors:
        try:
            probe = socket.socket(fileno=fd)  # raises for a descriptor that is not a socket
        except OSError:
            continue
        family = probe.family
        probe.detach()  # the descriptor stays open until decided here
        if family in (socket.AF_INET, socket.AF_INET6):
            os.close(fd)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Launchers and SLURM signal every process of a rank, and only the training process can tell a
    preemption from a launcher ending the survivors of a lost rank: a worker killed by the signal would
    raise in the middle of either. So a loader worker ignores SIGUSR1 and outlives SIGTERM by
    WORKER_GRACE_S, time for its training process to save or report and shut it down (a worker also
    ends when its training process is gone). SIGALRM, which ends it then, gets its default action back from
    the training process's batch deadline (pretrain.peers.bounded), which a worker forked meanwhile inherits."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_after_the_grace)


WORKER_GRACE_S = 20  # under torchrun's and SLURM's 30 s between SIGTERM and SIGKILL


def _end_after_the_grace(signum, frame) -> None:
    signal.alarm(WORKER_GRACE_S)  # SIGALRM's default action ends the worker
