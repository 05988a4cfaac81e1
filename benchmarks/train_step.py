"""Training throughput of one Mamba language model, side by side with what a user would otherwise run.

The same model (vocab 8192, d_model 256, 4 layers, d_state 16, expand 2, conv 4), the same token
batches, the same threads, fp32 on the CPU (bf16 on a GPU), trained by:

  ssmforge-model      models.LanguageModel: forward with the chunked loss (no full logits), backward, AdamW
  ssmforge-compiled   the same after model.compile() (train.compile: true)
  ssmforge-deepspeed  the same through the DeepSpeed engine, as `ssmforge pretrain` runs it
  hf-sequential       transformers' MambaForCausalLM without CUDA kernels: a loop over time steps
  hf-mambapy          the same with use_mambapy=True: the pure-PyTorch parallel scan

Every step clips gradients to norm 1; all but the DeepSpeed one step torch's fused AdamW. Each runs in its
own process (so peak memory is its own), warm-up steps excluded. Reported per run, from the median of the
timed steps: tokens/s, peak memory above the process's state before the first step, and the fraction of
the matmul-bound limit: the time the step's matmuls would take at the machine's dense matmul rate, over
the step time. The step's matmul FLOPs are those of the model's linear layers (projections and LM head:
2 x in x out per token forward, 3x that for forward and backward); the conv and the scan are not matmuls
and are not counted. The rate is the best of several 2048^3 fp32 products (8192^3 bf16 on a GPU) on the
same threads, timed before and after the runs. Then the scaling in sequence length at a constant number
of tokens per step, with the fitted exponent p of the cost per sequence ~ L^p (1 is linear). Writes
benchmarks/results/train_step.json and train_step.png.

    python benchmarks/train_step.py                 # the full table and the scaling (about 15 minutes on 2 cores)
    python benchmarks/train_step.py --no-scaling    # the table at L 512 only
    python benchmarks/train_step.py --shape 130m --seq-len 2048 --batch 8   # a GPU: Mamba-130M shape in bf16
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPLEMENTATIONS = ("ssmforge-model", "ssmforge-compiled", "ssmforge-deepspeed", "hf-sequential", "hf-mambapy")
SCALING_IMPLEMENTATIONS = ("ssmforge-model", "ssmforge-deepspeed", "hf-mambapy")  # hf-sequential: hours at L 8192
SHAPES = {  # name -> (d_model, n_layer, vocab)
    "small": (256, 4, 8192),
    "130m": (768, 24, 50280),
    "370m": (1024, 48, 50280),
}
TARGETS = dict(vs_mambapy=4.0, vs_sequential=100.0, deepspeed_within=0.15, matmul_fraction=0.60, scaling_flat=0.20)


def model_config(shape: str):
    from ssmforge.models import MambaConfig, ModelConfig

    d_model, n_layer, vocab = SHAPES[shape]
    return ModelConfig(family="mamba", d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                       mamba=MambaConfig(d_state=16, expand=2, d_conv=4))


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(vocab: int, batch: int, seq_len: int, count: int) -> list[torch.Tensor]:
    """Token batches (batch, seq_len + 1), the same for every implementation (seeded)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g) for _ in range(count)]


def matmul_flops_per_token(model: torch.nn.Module) -> int:
    """FLOPs of the matmuls of one training step (forward and backward) per token: every linear layer
    (each is applied once per token) costs 2 x in x out forward and twice that backward (the gradients of its
    input and of its weight). The embedding is a lookup, the conv and the scan are not matmuls."""
    return 3 * sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def full_logits_loss(model):
    """A transformers model's next-token loss as its users compute it: the full (batch, L, vocab) logits, then
    fp32 cross-entropy; called as `lm_loss` calls ssmforge's model."""
    def forward(input_ids, targets, reduction="mean", seq_idx=None, context=None):  # whole rows, one document each
        logits = model(input_ids=input_ids).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)

    return forward


def build_step(impl: str, shape: str, device: torch.device, dtype: torch.dtype):
    """A function running one training step on a batch, and the model it trains. Every implementation's loss
    goes through `ssmforge.pretrain.trainer.lm_loss`, the trainer's own (autocast to `dtype`, fp32 loss):
    ssmforge's model computes it chunk by chunk in its head, transformers' from its full logits."""
    from ssmforge.pretrain.trainer import lm_loss

    config = model_config(shape)
    torch.manual_seed(0)
    if impl in ("hf-sequential", "hf-mambapy"):
        import transformers

        hf_config = transformers.MambaConfig(
            vocab_size=config.padded_vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
            state_size=config.mamba.d_state, expand=config.mamba.expand, conv_kernel=config.mamba.d_conv,
            use_mambapy=impl == "hf-mambapy", tie_word_embeddings=True)
        model = transformers.MambaForCausalLM(hf_config).to(device).train()
        forward = full_logits_loss(model)
    else:
        from ssmforge.models import LanguageModel

        model = forward = LanguageModel(config).to(device).train()
        if impl == "ssmforge-compiled":
            model.compile()  # in place, as train.compile does; compiled during the warm-up steps
    if impl == "ssmforge-deepspeed":
        from ssmforge.pretrain.config import load_config
        from ssmforge.pretrain.engine import build_engine
        from ssmforge.pretrain.launch import init_distributed

        init_distributed()
        precision = "fp32" if dtype == torch.float32 else "bf16"
        run = load_config(None, ["run_dir=unused", "deepspeed.zero_stage=0", f"train.precision={precision}",
                                 "train.grad_clip=1.0", "train.warmup_steps=1", "train.max_steps=1000"])
        engine, _, _ = build_engine(model, run, world_size=1)

        def step(tokens):
            loss = lm_loss(engine, tokens, device, dtype)
            engine.backward(loss)
            engine.step()
            return loss.item()

        return step, model
    # fused: one kernel over all parameters (torch's default on CPU is a loop over them, ~4x slower here)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(tokens):
        loss = lm_loss(forward, tokens, device, dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(args) -> dict:
    """One implementation at one shape, in this process: the figures as a dict."""
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step, model = build_step(args.worker, args.shape, device, dtype)
    data = batches(model_config(args.shape).vocab_size, args.batch, args.seq_len, args.warmup + args.steps)
    for tokens in data[:args.warmup]:
        step(tokens)
    synchronize(device)
    before = rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    losses, step_seconds = [], []
    for tokens in data[args.warmup:]:
        start = time.perf_counter()
        losses.append(step(tokens))  # its .item() waits for the step to finish
        step_seconds.append(time.perf_counter() - start)
    seconds = statistics.median(step_seconds)  # other work on a shared machine only adds slow outliers
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    return dict(implementation=args.worker, seq_len=args.seq_len, batch=args.batch, seconds_per_step=seconds,
                step_seconds=step_seconds, tokens_per_s=args.batch * args.seq_len / seconds,
                peak_step_memory_mib=peak - before,
                first_loss=losses[0], device=str(device), dtype=str(dtype).replace("torch.", ""))


def run_worker(impl: str, args, seq_len: int, batch: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--worker", impl, "--shape", args.shape, "--seq-len", str(seq_len),
               "--batch", str(batch), "--steps", str(steps),
               "--warmup", str(1 if impl == "hf-sequential" else args.warmup),  # its steps take minutes
               "--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} at L={seq_len} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_rate(threads: int, repeats: int = 10) -> tuple[float, str]:
    """The machine's dense matmul rate (FLOP/s), the best of `repeats` timed products after a warm-up one:
    fp32 2048^3 on CPU, bf16 8192^3 on GPU. The best, because other work on the machine only slows a run."""
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = 8192 if cuda else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)  # preallocated: first touching fresh pages is no matmul time
    best = math.inf
    for i in range(repeats + 1):
        synchronize(torch.device(device))
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(torch.device(device))
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, str(dtype).replace("torch.", "")


def fitted_exponent(rows: list[dict]) -> float:
    """p in seconds per sequence ~ L^p, least squares on logs."""
    xs = [math.log(r["seq_len"]) for r in rows]
    ys = [math.log(r["seconds_per_step"] / r["batch"]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(scaling: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, rows in scaling.items():
        ax.plot([r["seq_len"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length L (tokens per step constant)")
    ax.set_ylabel("training tokens/s")
    ax.set_title("Mamba training throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation (their median counts)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--implementations", nargs="*", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    p.add_argument("--sequential-steps", type=int, default=2, help="timed steps of hf-sequential (slow)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--scaling-lengths", type=int, nargs="*", default=[512, 2048, 8192])
    p.add_argument("--scaling-tokens", type=int, default=8192, help="tokens per step in the scaling runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    p.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from benchmarks.machine import describe
    from ssmforge.models import LanguageModel

    rate, rate_dtype = matmul_rate(args.threads)
    with torch.device("meta"):  # shapes only: no weights allocated
        model = LanguageModel(model_config(args.shape))
    flops_per_token = matmul_flops_per_token(model)
    model_flops = 3 * model.forward_flops_per_token(args.seq_len)  # with the conv and the scan: what MFU counts
    print(f"matmul rate: {rate / 1e9:.1f} GFLOP/s ({rate_dtype}); model: {args.shape}, {flops_per_token / 1e6:.2f} "
          f"MFLOP of matmuls ({model_flops / 1e6:.2f} in all) per trained token at L={args.seq_len}")
    rows = {}
    for impl in args.implementations:
        steps = args.sequential_steps if impl == "hf-sequential" else args.steps
        rows[impl] = run_worker(impl, args, args.seq_len, args.batch, steps)
    rate = max(rate, matmul_rate(args.threads)[0])  # timed again after the runs: the best of both
    print(f"matmul rate, the best before and after the runs: {rate / 1e9:.1f} GFLOP/s")
    for impl, r in rows.items():
        r["matmul_fraction"] = flops_per_token * r["tokens_per_s"] / rate
        print(f"  {impl:20} {r['tokens_per_s']:10.0f} tokens/s  {r['seconds_per_step'] * 1e3:9.1f} ms/step  "
              f"peak +{r['peak_step_memory_mib']:7.0f} MiB  {100 * r['matmul_fraction']:5.1f}% of matmul-bound")

    checks = {}
    ours = rows.get("ssmforge-model")
    if ours and "hf-mambapy" in rows:
        ratio = ours["tokens_per_s"] / rows["hf-mambapy"]["tokens_per_s"]
        checks["vs_mambapy"] = dict(value=ratio, target=f">= {TARGETS['vs_mambapy']}x", ok=ratio >= TARGETS["vs_mambapy"])
        less = ours["peak_step_memory_mib"] <= rows["hf-mambapy"]["peak_step_memory_mib"]
        checks["memory_vs_mambapy"] = dict(value=ours["peak_step_memory_mib"] / rows["hf-mambapy"]["peak_step_memory_mib"],
                                           target="<= 1x", ok=less)
    if ours and "hf-sequential" in rows:
        ratio = ours["tokens_per_s"] / rows["hf-sequential"]["tokens_per_s"]
        checks["vs_sequential"] = dict(value=ratio, target=f">= {TARGETS['vs_sequential']}x",
                                       ok=ratio >= TARGETS["vs_sequential"])
    if ours and "ssmforge-deepspeed" in rows:
        slower = 1 - rows["ssmforge-deepspeed"]["tokens_per_s"] / ours["tokens_per_s"]
        checks["deepspeed_overhead"] = dict(value=slower, target=f"<= {TARGETS['deepspeed_within']}",
                                            ok=slower <= TARGETS["deepspeed_within"])
    if ours:
        checks["matmul_fraction"] = dict(value=ours["matmul_fraction"], target=f">= {TARGETS['matmul_fraction']}",
                                         ok=ours["matmul_fraction"] >= TARGETS["matmul_fraction"])

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    scaling = {}
    if not args.no_scaling:
        print(f"scaling at {args.scaling_tokens} tokens per step:")
        for impl in [i for i in args.implementations if i in SCALING_IMPLEMENTATIONS]:
            scaling[impl] = []
            for L in args.scaling_lengths:
                r = run_worker(impl, args, L, max(1, args.scaling_tokens // L), args.steps)
                scaling[impl].append(r)
            exponent = fitted_exponent(scaling[impl])
            rates = [r["tokens_per_s"] for r in scaling[impl]]
            spread = max(rates) / min(rates) - 1
            print(f"  {impl:20} " + "  ".join(f"L={r['seq_len']}: {r['tokens_per_s']:.0f}" for r in scaling[impl])
                  + f"  tokens/s; cost per sequence ~ L^{exponent:.3f}; spread {100 * spread:.1f}%")
            if impl == "ssmforge-model":
                checks["scaling_flat"] = dict(value=spread, exponent=exponent, target=f"<= {TARGETS['scaling_flat']}",
                                              ok=spread <= TARGETS["scaling_flat"])
        plot(scaling, Path(args.out).with_suffix(".png"))

    print("targets:")
    for name, c in checks.items():
        print(f"  {name:20} {c['value']:.3f} (target {c['target']}): {'met' if c['ok'] else 'MISSED'}")
    report = dict(machine=describe(), matmul_rate_flops=rate, matmul_dtype=rate_dtype, shape=args.shape,
                  matmul_flops_per_token=flops_per_token, model_flops_per_token=model_flops, seq_len=args.seq_len,
                  batch=args.batch, threads=args.threads, results=rows, scaling=scaling, targets=checks)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}" + ("" if args.no_scaling else f" and {Path(args.out).with_suffix('.png')}"))


if __name__ == "__main__":
    main()
