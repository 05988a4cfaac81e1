"""The streaming loader: exact resumption, a disjoint per-rank partition, damaged shards named."""
import json
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch

from ssmforge.data_pipeline.loader import build_loader
from ssmforge.data_pipeline.pack import prepare
from ssmforge.errors import DataError

from .conftest import run_config
from .test_pack import read_split


@pytest.fixture
def shards(tmp_path, corpus):
    path, _ = corpus
    config = run_config(tmp_path, [path])
    prepare(config)
    return config


def take(loader, n):
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def loader(config, split="train", workers=0, seed=5):
    return build_loader(config.data.shard_dir, split, 4, seed, config.data.cache_dir, num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_sees_exactly_the_remaining_batches(shards, workers):
    full = take(loader(shards, workers=workers), 12)
    interrupted = loader(shards, workers=workers)
    first = take(interrupted, 5)
    state = interrupted.state_dict()
    del interrupted
    resumed = loader(shards, workers=workers)
    resumed.load_state_dict(state)
    rest = take(resumed, 7)
    assert all(torch.equal(a, b) for a, b in zip(full, first + rest))
    assert full[0].shape == (4, 33) and full[0].dtype == torch.int64


def test_shuffle_is_deterministic_by_seed(shards):
    a, b, c = take(loader(shards, seed=1), 3), take(loader(shards, seed=1), 3), take(loader(shards, seed=2), 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_an_epoch_covers_every_sample_once(shards):
    from ssmforge.data_pipeline.manifest import read_manifest

    n = read_manifest(shards.data.shard_dir).splits["train"].samples
    rows = torch.cat(list(loader(shards)))
    assert len(rows) == n // 4 * 4
    assert len({tuple(r.tolist()) for r in rows}) == len(rows)


def _rank_samples(config, rank, port, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo")
    rows = torch.cat(list(loader(config)))
    queue.put((rank, [tuple(r.tolist()) for r in rows]))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def _polling_threads(dataset) -> int:
    """How many threads are inside streaming's per-epoch polling loops for this dataset."""
    import sys

    return sum(1 for frame in sys._current_frames().values()
               if frame.f_code.co_name in ("_prepare_thread", "_ready_thread") and frame.f_locals.get("self") is dataset)


def test_an_epoch_left_part_way_stops_streamings_threads(shards):
    import time

    reader = loader(shards)
    batches = iter(reader)
    next(batches)
    # readiness still polls (and preparation, unless it has already prepared every sample)
    assert _polling_threads(reader.dataset) >= 1
    del batches  # what training does at max_steps, and validation after eval_batches
    deadline = time.monotonic() + 5
    while _polling_threads(reader.dataset) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _polling_threads(reader.dataset) == 0
    assert len(take(reader, 2)) == 2  # the loader still reads a new epoch afterwards



def test_loader_workers_leave_stop_signals_to_the_training_process(shards, monkeypatch):
    """SIGUSR1 (SLURM's warning, sent to every process of a task) does not end a worker; SIGTERM ends it
    only after the grace, time for the training process to save or report first."""
    import signal
    import time

    from ssmforge.data_pipeline import loader as loader_module

    monkeypatch.setattr(loader_module, "WORKER_GRACE_S", 2)  # read in the forked worker
    batches = iter(loader(shards, workers=1))
    next(batches)
    (worker,) = _forked_children()
    os.kill(worker, signal.SIGUSR1)
    os.kill(worker, signal.SIGTERM)
    time.sleep(1.0)
    assert worker in _forked_children()
    assert len([next(batches) for _ in range(3)]) == 3  # still serving
    with pytest.raises(RuntimeError, match="killed by signal: Alarm clock"):  # the grace's end, seen by torch
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.1)
    assert worker not in _forked_children()


def _forked_children() -> list[int]:
    """Live children of this process running its own command line (forked: loader workers)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == me and stat.rsplit(")", 1)[1].split()[0] != "Z" and \
                    (entry / "cmdline").read_bytes() == Path("/proc/self/cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found

def test_two_ranks_read_disjoint_halves(shards):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank_samples, args=(shards, rank, port, queue)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    every = {tuple(r) for r in read_split(Path(shards.data.shard_dir) / "train").tolist()}
    a, b = set(results[0]), set(results[1])
    assert not a & b
    assert len(a) == len(b) > 0
    assert a | b <= every and len(a | b) > len(every) - 8  # each rank drops at most a partial batch of 4


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), r"shard\.00000\.mds\.zstd: shard is truncated"),
    (lambda p: p.write_bytes(b"\x00" + p.read_bytes()[1:]), r"shard\.00000\.mds\.zstd: shard content does not match"),
    (lambda p: p.unlink(), r"shard\.00000\.mds\.zstd: shard missing"),
])
def test_damaged_shards_are_named_before_any_batch(shards, damage, message):
    damage(Path(shards.data.shard_dir) / "train" / "shard.00000.mds.zstd")
    with pytest.raises(DataError, match=message):
        loader(shards)


def test_unprepared_folder(tmp_path):
    with pytest.raises(DataError, match=r"index\.json: missing; run `ssmforge prepare`"):
        build_loader(str(tmp_path), "train", 4, 0, str(tmp_path / "cache"))


def test_a_token_id_outside_the_vocabulary_is_named_with_its_shard_before_it_is_batched(shards, tmp_path):
    import shutil

    import numpy as np
    from streaming import MDSWriter

    good = take(build_loader(shards.data.shard_dir, "train", 4, 5, shards.data.cache_dir, vocab_size=260), 3)
    assert all(int(b.max()) < 260 for b in good)  # intact shards pass the check
    # a copy whose train split is intact and correctly hashed, but written with a wrong id in one sample
    bad_dir = tmp_path / "bad-shards"
    shutil.copytree(shards.data.shard_dir, bad_dir, ignore=shutil.ignore_patterns("train"))
    samples = read_split(Path(shards.data.shard_dir) / "train")
    samples[5] = samples[5].copy()
    samples[5][17] = 999
    columns = {"tokens": f"ndarray:{samples[0].dtype.name}:{samples[0].shape[0]}"}
    with MDSWriter(out=str(bad_dir / "train"), columns=columns, compression="zstd", hashes=["xxh64"]) as writer:
        for tokens in samples:
            writer.write({"tokens": np.asarray(tokens)})
    checked = build_loader(str(bad_dir), "train", 4, 5, str(tmp_path / "cache"), vocab_size=260)
    with pytest.raises(DataError, match=r"bad-shards/train/shard\.00000\.mds(\.zstd)?: sample 5 holds token id 999, "
                                        r"outside the vocabulary \[0, 260\)"):
        for _ in checked:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="descriptors are listed from /proc/self/fd")
def test_a_forked_worker_closes_its_copies_of_the_network_sockets_only():
    """The worker's copies of TCP sockets (a rank's process-group connections) are closed, so a killed rank's
    connections reset at once; its Unix sockets and pipes (the loader's queues) stay, and the parent keeps all."""
    import socket

    from ssmforge.data_pipeline.loader import close_inherited_network_sockets

    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    unix_a, unix_b = socket.socketpair()
    pipe_r, pipe_w = os.pipe()
    tcp = [server.fileno(), client.fileno(), accepted.fileno()]
    kept = [unix_a.fileno(), unix_b.fileno(), pipe_r]
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        close_inherited_network_sockets()
        open_fds = {fd for fd in tcp + kept if os.path.exists(f"/proc/self/fd/{fd}")}
        os.write(report_w, json.dumps(sorted(open_fds)).encode())
        os._exit(0)
    os.close(report_w)
    child_open = json.loads(os.read(report_r, 4096).decode())
    os.waitpid(pid, 0)
    assert child_open == sorted(kept)
    assert all(os.path.exists(f"/proc/self/fd/{fd}") for fd in tcp + kept)  # the parent's stay open
    client.sendall(b"x")
    assert accepted.recv(1) == b"x"  # and still connected
    for item in (server, client, accepted, unix_a, unix_b):
        item.close()
    for fd in (pipe_r, pipe_w, report_r):
        os.close(fd)
