"""Peak memory of one training step at a 50k vocabulary: the loss from full logits against the chunked
head loss of `kernels.linear_cross_entropy` (what training uses).

A 2-layer Mamba (d_model 256, vocab 50,280 as in the Pile recipes), one forward + backward of a
(batch, L) micro-batch, fp32 on a CPU and bf16 autocast on a GPU, each variant in a process of its own.
The peak is measured above the memory held before the step (model built, no gradients yet), so it
counts the gradients, the activations and the head. Writes benchmarks/results/head_memory.json.

    python benchmarks/head_memory.py                      # batch 4 x 2048 tokens
    python benchmarks/head_memory.py --batch 32           # the 130M recipe's micro-batch (a GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("full-logits", "chunked")


def worker(variant: str, batch: int, seq_len: int) -> dict:
    from benchmarks.memory import peak_memory
    from ssmforge.models import LanguageModel, ModelConfig
    from ssmforge.models.config import MambaConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig(family="mamba", d_model=256, n_layer=2, vocab_size=50280, mamba=MambaConfig())
    torch.manual_seed(0)
    model = LanguageModel(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    with peak_memory(device) as peak:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if variant == "chunked":
                loss = model(tokens[:, :-1], targets=tokens[:, 1:])
            else:
                loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    return dict(variant=variant, batch=batch, seq_len=seq_len, vocab=config.padded_vocab_size,
                loss=loss.item(), peak_step_memory_mib=peak.bytes / 2**20, device=str(device),
                dtype=str(dtype).replace("torch.", ""))


def main() -> None:
    from benchmarks.machine import describe
    from benchmarks.memory import MALLOC_ENV

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq_len)))
        return
    rows = []
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--worker", variant, "--batch", str(args.batch),
                               "--seq-len", str(args.seq_len)], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, **MALLOC_ENV})
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{variant:12s} batch {r['batch']} x L {r['seq_len']}, vocab {r['vocab']}, {r['dtype']} on "
              f"{r['device']}: peak +{r['peak_step_memory_mib']:8.0f} MiB (loss {r['loss']:.4f})")
    full_logits_mib = args.batch * args.seq_len * rows[0]["vocab"] * 4 / 2**20
    print(f"one fp32 copy of the full logits: {full_logits_mib:.0f} MiB; chunked saves "
          f"{rows[0]['peak_step_memory_mib'] - rows[1]['peak_step_memory_mib']:.0f} MiB")
    out = ROOT / "benchmarks" / "results" / "head_memory.json"
    out.write_text(json.dumps(dict(machine=describe(), rows=rows, full_logits_fp32_mib=full_logits_mib), indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
