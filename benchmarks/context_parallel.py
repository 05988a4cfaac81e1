"""Context parallelism on this machine: per-rank memory, tokens/s and the exchange per layer, against the length.

For each family, length L and group size K, K gloo processes each run one training step (forward and backward)
of a 2-layer d_model 128 model on its L/K tokens of one sequence, the state exchanged through the group
(models.context_parallel). Each rank reports:
- the activations autograd keeps for backward (bytes of the distinct tensors saved, parameters excluded),
- how far its peak resident memory rose during the step (VmHWM, benchmarks.memory),
- the bytes it sent through the group in the forward, per layer (the backward all-reduces the gradient of
  every gathered stack, K times those bytes),
and the group's tokens/s is L over the slowest rank's step time (the second step; the first warms up).
Every rank runs with cores / K threads, so on a machine with fewer cores than ranks the timing shows
the cost of sharing them, not of the method.

    python benchmarks/context_parallel.py                 # 8k, 32k, 128k tokens; K = 1, 2, 4; about 10 minutes
    python benchmarks/context_parallel.py --lengths 8192 --groups 1 2 --families mamba

It also times Mamba-2's two ways to apply the entering state to a chunk: the contraction the mixer uses and a
second chunked scan from that state (`--skip-correction` leaves it out).

Writes benchmarks/results/context_parallel.json and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAMILIES = ("mamba", "mamba2", "gss")


def model_config(family: str) -> dict:
    extra = {"mamba2": dict(mamba2=dict(headdim=32, chunk_size=64))}.get(family, {})
    return dict(family=family, d_model=128, n_layer=2, vocab_size=260, **extra)


def saved_bytes(run) -> int:
    """run() under autograd; the bytes of the distinct tensors it saved for backward, parameters excluded."""
    import torch

    storages = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storages.values())


def _rank(rank: int, size: int, family: str, length: int, threads: int, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from benchmarks.memory import peak_memory
    from ssmforge.models import LanguageModel
    from ssmforge.models.config import ModelConfig
    from ssmforge.models.context_parallel import ContextParallel

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    group = dist.new_group(list(range(size)))
    sent = []
    context = ContextParallel(group, rank, size, comm_bytes=sent) if size > 1 else None
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_dict(model_config(family)))
    tokens = torch.randint(1, 260, (1, length + 1), generator=torch.Generator().manual_seed(1))
    result = {}
    for step in range(2):
        sent.clear()
        dist.barrier()
        start = time.perf_counter()
        with peak_memory(torch.device("cpu")) as peak:
            loss, kept = saved_bytes(lambda: model(tokens[:, :-1], targets=tokens[:, 1:], context=context))
            forward_sent = sum(sent)
            loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        del loss
        result = dict(rank=rank, seconds=seconds, saved_bytes=kept, peak_rss_bytes=peak.bytes,
                      sent_bytes_per_layer=forward_sent / model.config.n_layer)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(family: str, length: int, size: int, cores: int) -> dict:
    import torch.multiprocessing as mp

    from benchmarks.memory import MALLOC_ENV

    os.environ.update(MALLOC_ENV)  # inherited by the spawned ranks: freed blocks go back, peaks stay visible
    with tempfile.TemporaryDirectory() as folder:
        threads = max(1, cores // size)
        mp.spawn(_rank, args=(size, family, length, threads, f"{folder}/init", folder), nprocs=size, join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(size)]
    slowest = max(r["seconds"] for r in ranks)
    return dict(family=family, length=length, K=size, threads_per_rank=threads, tokens_per_s=length / slowest,
                saved_mib=max(r["saved_bytes"] for r in ranks) / 2**20,
                peak_rss_mib=max(r["peak_rss_bytes"] for r in ranks) / 2**20,
                sent_kib_per_layer=max(r["sent_bytes_per_layer"] for r in ranks) / 2**10, ranks=ranks)


def mamba2_correction(length: int = 8192, repeats: int = 3) -> dict:
    """Seconds of forward + backward of the two ways to add an entering state h0 to one chunk's SSD outputs:
    the contraction C_t exp(A cum_t) h0 (what the mixer does) and a second chunked scan from h0."""
    import torch
    import torch.nn.functional as F

    from ssmforge.kernels import ssd_scan

    g = torch.Generator().manual_seed(0)
    batch, heads, headdim, n = 1, 8, 32, 64
    x = torch.randn(batch, length, heads, headdim, generator=g, requires_grad=True)
    dt = torch.randn(batch, length, heads, generator=g, requires_grad=True)
    A = -torch.rand(heads, generator=g)
    B = torch.randn(batch, length, 1, n, generator=g, requires_grad=True)
    C = torch.randn(batch, length, 1, n, generator=g, requires_grad=True)
    h0 = torch.randn(batch, heads, headdim, n, generator=g, requires_grad=True)

    def contraction():
        decay = torch.exp(torch.cumsum(F.softplus(dt), dim=1) * A)  # (batch, L, heads)
        return torch.einsum("blgn,bgrpn,blgr->blgrp", C, h0.view(batch, 1, heads, headdim, n),
                            decay.view(batch, length, 1, heads))

    def rescan():
        return ssd_scan(x, dt, A, B, C, chunk_size=64, dt_softplus=True, initial_state=h0)

    timings = {}
    for name, run in (("contraction", contraction), ("second_scan", rescan)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run().sum().backward()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    return dict(length=length, heads=heads, headdim=headdim, d_state=n, seconds=timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--skip-correction", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "context_parallel.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    result = dict(machine=dict(cpus=cores, processor=platform.processor() or platform.machine()),
                  command=" ".join(["python", "benchmarks/context_parallel.py", *sys.argv[1:]]), rows=rows)
    if not args.skip_correction:
        result["mamba2_entering_state"] = mamba2_correction()
    for family in args.families:
        for length in args.lengths:
            for size in args.groups:
                row = measure(family, length, size, cores)
                rows.append(row)
                Path(args.out).write_text(json.dumps(result, indent=1))  # each row as it comes: a long run
                print(f"{family} L={length} K={size}: {row['tokens_per_s']:.0f} tokens/s, saved {row['saved_mib']:.1f} "
                      f"MiB, peak RSS +{row['peak_rss_mib']:.1f} MiB, sent {row['sent_kib_per_layer']:.1f} KiB/layer",
                      flush=True)
    print("\n| family | L | K | activations kept per rank (MiB) | peak RSS growth per rank (MiB) | sent per layer "
          "(KiB) | tokens/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['length'] // 1024}k | {r['K']} | {r['saved_mib']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['sent_kib_per_layer']:.1f} | {r['tokens_per_s']:,.0f} |")
    if "mamba2_entering_state" in result:
        s = result["mamba2_entering_state"]["seconds"]
        print(f"\nMamba-2 entering state over 8k tokens, forward + backward: contraction {s['contraction']:.3f} s, "
              f"second chunked scan {s['second_scan']:.3f} s")


if __name__ == "__main__":
    main()
