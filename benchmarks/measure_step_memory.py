"""The peak memory of real training steps on this machine, per rank: what `ssmforge plan` is checked against.

Run as one process per rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, as a launcher sets them):

    python benchmarks/measure_step_memory.py CONFIG [key=value ...]

Builds the configured model and its DeepSpeed engine exactly as `ssmforge pretrain` does, runs three
optimizer steps on random tokens (the first allocates the optimizer states; with train.context_parallel, each
rank its chunk of the same rows), and prints one JSON line
per rank: the peak memory above the memory held before the model was built (benchmarks.memory: VmHWM
on a CPU, the allocator's peak on a GPU). Start it with benchmarks.memory.MALLOC_ENV in the environment.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> None:
    from benchmarks.memory import peak_memory
    from ssmforge.models import LanguageModel
    from ssmforge.pretrain.collectives import context_group
    from ssmforge.pretrain.config import load_config
    from ssmforge.pretrain.engine import autocast, build_engine, resolve_precision
    from ssmforge.pretrain.launch import init_distributed, shutdown

    import deepspeed  # noqa: F401  its code is no training memory: loaded before the count starts

    config = load_config(argv[0], argv[1:] + ["run_dir=unused"])
    world, device = init_distributed(config.train.collective_timeout_s)
    dtype = resolve_precision(config.train.precision, device)
    torch.manual_seed(config.seed)
    batch, seq_len = config.train.micro_batch_size, config.data.seq_len
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq_len + 1), device=device)
    context = context_group(world.rank, world.world_size, config.train.context_parallel)
    with peak_memory(device) as peak:
        model = LanguageModel(config.model).to(device)
        engine, _, _ = build_engine(model, config, world.world_size)
        for _ in range(3 * engine.gradient_accumulation_steps()):
            with autocast(device, dtype):
                loss = engine(tokens[:, :-1], targets=tokens[:, 1:], context=context)
            engine.backward(loss)
            engine.step()
    print(json.dumps({"rank": world.rank, "peak_bytes": peak.bytes, "loss": loss.item()}), flush=True)
    shutdown()
    # The measurement is printed and the group destroyed; skip the interpreter's teardown, where a native thread
    # of the distributed stack still joinable at exit can abort the process ("terminate called without an
    # active exception", seen once under ZeRO-3) and turn a finished measurement into a failed one.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
