"""`ssmforge plan` against real training steps: the planned peak memory per rank and the peak measured on
this machine (benchmarks/measure_step_memory.py: the VmHWM of each rank's process above the memory it held
before the model was built), for several model families at ZeRO 0 and ZeRO 3 on 2 ranks.

Each configuration is scaled to a size where training memory, not the interpreter, dominates
(SCALE: d_model 512, seq_len 1024, micro-batch 4, vocabulary 50,280). Writes
benchmarks/results/plan_accuracy.json.

    python benchmarks/plan_accuracy.py            # about 15 minutes on 2 cores
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ("quickstart", "hybrid-tiny", "mamba2-tiny", "gss-tiny")
SCALE = ("model.d_model=512", "data.seq_len=1024", "train.micro_batch_size=4", "model.vocab_size=50280")


def measured_peak(config: Path, overrides: list[str], ranks: int = 2) -> int:
    """The largest per-rank peak of real training steps (bytes), each rank a process of its own."""
    from benchmarks.memory import MALLOC_ENV
    from ssmforge.pretrain.launch import free_port

    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_", "MASTER_"))}
    base.update(MALLOC_ENV, WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    command = [sys.executable, str(ROOT / "benchmarks" / "measure_step_memory.py"), str(config), *overrides]
    procs = [subprocess.Popen(command, cwd=ROOT, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    peaks = []
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"measuring {config.name} failed:\n{err[-3000:]}")
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak_bytes"])
    return max(peaks)


def planned_peak(config: Path, overrides: list[str], ranks: int = 2) -> int:
    """The planner's peak per rank for the same run on this CPU."""
    from ssmforge.pretrain.config import load_config
    from ssmforge.pretrain.plan import Target, step_memory

    run = load_config(config, [*overrides, "run_dir=unused"])
    target = Target(ranks, "cpu", "this CPU", None, 0.0, "")
    return step_memory(run, target, run.train.micro_batch_size, run.train.activation_checkpointing)[0].peak


def main() -> None:
    from benchmarks.machine import describe

    rows = []
    for name in CONFIGS:
        for stage in (0, 3):
            config, overrides = ROOT / "configs" / f"{name}.yaml", [*SCALE, f"deepspeed.zero_stage={stage}"]
            planned, measured = planned_peak(config, overrides), measured_peak(config, overrides)
            rows.append(dict(config=name, zero_stage=stage, planned_mib=planned / 2**20, measured_mib=measured / 2**20,
                             error=planned / measured - 1))
            r = rows[-1]
            print(f"{name:12s} ZeRO-{stage}: planned {r['planned_mib']:7.0f} MiB, measured {r['measured_mib']:7.0f} MiB "
                  f"({r['error']:+.1%})", flush=True)
    out = ROOT / "benchmarks" / "results" / "plan_accuracy.json"
    out.write_text(json.dumps(dict(machine=describe(), scale=SCALE, ranks=2, rows=rows), indent=1))
    print(f"worst error {max(abs(r['error']) for r in rows):.1%}; wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
