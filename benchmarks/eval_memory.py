"""Evaluation memory against document length: eval-ppl's chunked recurrent path keeps it constant in L.

For each family, a 2-layer d_model 256 model scores one document of each length through
evaluation.perplexity.token_nll, once in chunks of `--chunk` tokens (the state carried from chunk to chunk,
as eval-ppl does past the training length) and once in a single forward. Each measurement runs in a
process of its own and reports how far the process's resident high-water mark rose above its resident
memory at the start of scoring (VmHWM, reset first: benchmarks.memory.peak_memory). Not ru_maxrss: Linux
carries that across the fork and exec that start the process, so a large parent would hide the growth. The hybrid (`M*`) has a
sliding attention window of the chunk length, which is what lets its attention layers stay within a chunk.

    python benchmarks/eval_memory.py                  # 8k and 32k tokens, four families, about 4 minutes
    python benchmarks/eval_memory.py --lengths 8192 65536 --families mamba

Writes benchmarks/results/eval_memory.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAMILIES = ("mamba", "mamba2", "gss", "hybrid")


def model_config(family: str, window: int) -> dict:
    extra = {"mamba2": dict(mamba2=dict(headdim=32, chunk_size=64)),
             "hybrid": dict(layer_pattern="M*", attention=dict(heads=4, window=window))}.get(family, {})
    return dict(family=family, d_model=256, n_layer=2, vocab_size=260, **extra)


def score_once(family: str, length: int, chunk: int | None, window: int) -> dict:
    """In this process: the peak memory growth (MiB) and seconds of scoring one document of `length` tokens."""
    import torch

    from benchmarks.memory import peak_memory
    from ssmforge.evaluation.perplexity import token_nll
    from ssmforge.models import LanguageModel, ModelConfig

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_dict(model_config(family, window))).eval()
    ids = torch.randint(0, 260, (1, length), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    with torch.no_grad(), peak_memory(torch.device("cpu")) as peak:
        nll = token_nll(model, ids, ids, chunk_length=chunk)
    seconds = time.perf_counter() - start
    return dict(peak_growth_mib=round(peak.bytes / 2**20, 1), seconds=round(seconds, 2), mean_nll=float(nll.mean()))


def measure(family: str, length: int, chunk: int | None, window: int) -> dict:
    """score_once in a fresh process (its peak is its own), large blocks returned to the system when freed."""
    from benchmarks.memory import MALLOC_ENV

    proc = subprocess.run([sys.executable, __file__, "--one", family, str(length), str(chunk or 0), str(window)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800, env={**os.environ, **MALLOC_ENV})
    if proc.returncode != 0:
        raise RuntimeError(f"{family} L={length} chunk={chunk}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict], lengths: list[int]) -> str:
    head = " | ".join(f"{mode} {length // 1024}k" for mode in ("chunked", "one forward") for length in lengths)
    lines = [f"| family | {head} |", "|---" * (1 + 2 * len(lengths)) + "|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        cells = []
        for chunked in (True, False):
            for length in lengths:
                (r,) = [r for r in rows if r["family"] == family and r["length"] == length and r["chunked"] == chunked]
                cells.append(f"{r['peak_growth_mib']:,.0f}")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--lengths", nargs="*", type=int, default=[8192, 32768])
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_memory.json"))
    p.add_argument("--one", nargs=4, metavar=("FAMILY", "LENGTH", "CHUNK", "WINDOW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        family, length, chunk, window = args.one
        print(json.dumps(score_once(family, int(length), int(chunk) or None, int(window))))
        return 0
    rows = []
    for family in args.families:
        for chunked in (True, False):
            for length in args.lengths:
                row = dict(family=family, length=length, chunked=chunked,
                           **measure(family, length, args.chunk if chunked else None, args.chunk))
                print(f"{family:7s} L={length:6d} {'chunked' if chunked else 'one forward':11s} "
                      f"peak +{row['peak_growth_mib']:,.1f} MiB in {row['seconds']:.1f} s", flush=True)
                rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    report = dict(command=shlex.join(["python", "benchmarks/eval_memory.py",
                                      *(argv if argv is not None else sys.argv[1:])]),
                  chunk=args.chunk, model="2 layers, d_model 256, batch 1", rows=rows,
                  machine=dict(platform=platform.platform(), python=platform.python_version(),
                               cpus=os.cpu_count(), torch_threads=torch.get_num_threads()),
                  table=table(rows, args.lengths))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nPeak memory growth while scoring one document (MiB), chunks of {args.chunk}:\n\n{report['table']}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
