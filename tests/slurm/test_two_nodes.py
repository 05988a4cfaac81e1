"""Two "nodes" on one machine: two process groups with node ranks 0 and 1 over loopback train exactly
as one node with the same world size.

mosaicml-streaming keeps per-node shared memory in /dev/shm, named after the local shard folder; two
nodes' local leaders on one machine would claim the same names (FileExistsError '/000152_locals'). A
real node has its own /dev/shm, so each "node" here gets one: a private mount namespace with a fresh
tmpfs on /dev/shm (`unshare -m`, needs root). The shard folder itself is shared, as on a cluster's
shared file system."""
import subprocess

import pytest

from .conftest import ROOT, clean_env, pretrain_command, train_losses

STEPS = ("train.max_steps=6", "train.log_every=1", "train.eval_every=100", "train.save_every=100")
PRIVATE_SHM = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node"]


def _private_shm_works() -> str | None:
    try:
        proc = subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit code {proc.returncode}")


def _launch(run_dir, nodes: int, per_node: int) -> dict[int, float]:
    from ssmforge.pretrain.launch import free_port

    world = nodes * per_node
    env = clean_env(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(per_node), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    command = pretrain_command(run_dir, *STEPS)
    procs = []
    for rank in range(world):
        node, local = divmod(rank, per_node)
        procs.append(subprocess.Popen((PRIVATE_SHM if nodes > 1 else []) + command, cwd=ROOT, text=True,
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(local), "NODE_RANK": str(node)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    errors = [proc.communicate(timeout=900)[1] for proc in procs]
    # every rank's end: a rank that names a lost peer says nothing of why the peer ended
    assert [proc.returncode for proc in procs] == [0] * world, \
        "\n".join(f"rank {rank} (exit {proc.returncode}): {err[-3000:]}"
                  for rank, (proc, err) in enumerate(zip(procs, errors)) if proc.returncode)
    return train_losses(run_dir)


@pytest.mark.slow
def test_two_nodes_over_loopback_match_one_node(tmp_path):
    problem = _private_shm_works()
    if problem:
        pytest.skip(f"cannot give each simulated node its own /dev/shm (unshare -m): {problem}")
    one_node = _launch(tmp_path / "one_node", nodes=1, per_node=2)
    two_nodes = _launch(tmp_path / "two_nodes", nodes=2, per_node=1)
    assert sorted(one_node) == sorted(two_nodes) == list(range(1, 7))
    for step in one_node:
        assert two_nodes[step] == pytest.approx(one_node[step], abs=1e-6), step
    assert one_node[6] < one_node[1]
