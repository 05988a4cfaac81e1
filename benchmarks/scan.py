"""Selective-scan kernel benchmark: forward and forward+backward of each backend over a sweep of L and d.

Prints a table (ms, tokens/s, GB/s against the bytes the fused kernel must move) and writes JSON
under benchmarks/results/ with the machine described. On CPU it times the "cpu" path, compares it
with the sequential oracle at one shape and measures peak extra memory; on CUDA it times "triton"
and reports the fraction of the device's copy bandwidth achieved.

    python benchmarks/scan.py            # default sweep, a few minutes on 2 cores
    python benchmarks/scan.py --quick    # seconds
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ssmforge import kernels  # noqa: E402
from benchmarks.machine import describe  # noqa: E402


def make_inputs(batch, d, L, n, device, dtype=torch.float32, grad=True):
    """Mamba-like inputs: input-dependent B/C (batch, n, L), z gate, D, delta_bias, softplus."""
    g = torch.Generator().manual_seed(0)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype).requires_grad_(grad)  # noqa: E731
    A = (-torch.rand(d, n, generator=g) * 4 - 0.1).to(device).requires_grad_(grad)
    return dict(u=t(batch, d, L), delta=t(batch, d, L, scale=0.5), A=A, B=t(batch, n, L), C=t(batch, n, L),
                D=torch.randn(d, device=device).requires_grad_(grad), z=t(batch, d, L),
                delta_bias=torch.randn(d, device=device).requires_grad_(grad))


def fused_bytes(batch, d, L, n, elt=4, backward=False):
    """Bytes a fused kernel must move: inputs once, outputs once, no (batch, d, L, n) state."""
    rows, bc = batch * d * L * elt, batch * n * L * elt
    fwd = 3 * rows + 2 * bc + rows  # u, delta, z, B, C in; out
    if not backward:
        return fwd
    return fwd + 4 * rows + 2 * bc + 3 * rows + 2 * bc  # reread u, delta, z, dout, B, C; write du, ddelta, dz, dB, dC


def timed(fn, repeats, device, warmup=True, min_total_s=1.0):
    """Best of at least `repeats` runs, and of more while they add up to under min_total_s: on a
    shared machine the minimum is the figure that other processes disturb least."""
    if warmup:
        fn()  # compilation, allocation
    best, total, runs = float("inf"), 0.0, 0
    while runs < repeats or total < min_total_s:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        best, total, runs = min(best, elapsed), total + elapsed, runs + 1
    return best


def measure(backend, batch, d, L, n, device, repeats, warmup=True):
    inputs = make_inputs(batch, d, L, n, device)
    scan = lambda: kernels.selective_scan(**inputs, delta_softplus=True, backend=backend)  # noqa: E731

    def fwd():
        with torch.no_grad():
            scan()

    def fwd_bwd():
        scan().sum().backward()

    budget = 1.0 if warmup else 0.0  # the oracle: a single run
    t_f, t_fb = timed(fwd, repeats, device, warmup, budget), timed(fwd_bwd, repeats, device, warmup, budget)
    return dict(backend=backend, batch=batch, d=d, L=L, n=n, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3,
                fwd_tokens_per_s=batch * L / t_f, fwd_bwd_tokens_per_s=batch * L / t_fb,
                fwd_GBps=fused_bytes(batch, d, L, n) / t_f / 1e9,
                fwd_bwd_GBps=fused_bytes(batch, d, L, n, backward=True) / t_fb / 1e9)


PEAK_MEMORY_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from scan import make_inputs
from ssmforge import kernels
def hwm_kib():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
inputs = make_inputs({batch}, {d}, {L}, {n}, 'cpu')
kernels.selective_scan(**{{k: v.detach()[..., :8] if v.dim() == 3 else v.detach() for k, v in inputs.items()}},
                       backend={backend!r})  # load libraries before the baseline
before = hwm_kib()
kernels.selective_scan(**inputs, delta_softplus=True, backend={backend!r}).sum().backward()
print((hwm_kib() - before) * 1024)
"""


def peak_extra_bytes(backend, batch, d, L, n):
    """Peak resident memory added by one forward+backward, in a fresh process (Linux VmHWM)."""
    if not Path("/proc/self/status").exists():
        return None
    code = PEAK_MEMORY_SCRIPT.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), batch=batch, d=d, L=L, n=n,
                                     backend=backend)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def copy_bandwidth_GBps() -> float:
    """Achievable device memory bandwidth: a large device-to-device copy (read + write)."""
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), 10, "cuda")
    return 2 * x.numel() * 4 / seconds / 1e9


def print_table(rows, extra_cols=()):
    head = f"{'backend':8} {'batch':>5} {'d':>5} {'L':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd+bwd tok/s':>14} " \
           f"{'fwd GB/s':>9} {'f+b GB/s':>9} {'ns/row-step':>11}"
    print(head + "".join(f" {c:>10}" for c in extra_cols))
    for r in rows:
        per_step = r["fwd_bwd_ms"] * 1e6 / (r["batch"] * r["L"] * r["d"])  # fwd+bwd ns per (batch, d) row and step
        line = f"{r['backend']:8} {r['batch']:5d} {r['d']:5d} {r['L']:6d} {r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} " \
               f"{r['fwd_bwd_tokens_per_s']:14.0f} {r['fwd_GBps']:9.2f} {r['fwd_bwd_GBps']:9.2f} {per_step:11.2f}"
        print(line + "".join(f" {r.get(c, float('nan')):10.3f}" for c in extra_cols))


def linearity(rows):
    """Per d: fwd+bwd time per step relative to the shortest L (1.0 everywhere = exactly linear), and a
    least-squares fit ms = intercept + slope * L with its R^2."""
    result = {}
    for d in sorted({r["d"] for r in rows}):
        sweep = sorted((r for r in rows if r["d"] == d), key=lambda r: r["L"])
        base = sweep[0]["fwd_bwd_ms"] / sweep[0]["L"]
        Ls = torch.tensor([float(r["L"]) for r in sweep], dtype=torch.float64)
        ms = torch.tensor([r["fwd_bwd_ms"] for r in sweep], dtype=torch.float64)
        design = torch.stack([torch.ones_like(Ls), Ls], dim=1)
        intercept, slope = torch.linalg.lstsq(design, ms[:, None]).solution[:, 0].tolist()
        residual = ms - (intercept + slope * Ls)
        r2 = 1.0 - float((residual**2).sum() / ((ms - ms.mean()) ** 2).sum()) if len(sweep) > 2 else 1.0
        result[d] = dict(per_step_vs_shortest={r["L"]: round(r["fwd_bwd_ms"] / r["L"] / base, 3) for r in sweep},
                         fit_ms_per_1k_steps=round(slope * 1e3, 3), fit_intercept_ms=round(intercept, 3),
                         fit_r2=round(r2, 4))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short sweep and no oracle timing")
    p.add_argument("--L", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--d", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="best of this many runs (the machine may be shared)")
    p.add_argument("--threads", type=int, default=None, help="torch (and CPU kernel) threads; default torch's")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/scan_{cpu,gpu}[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.L, args.d, args.repeats = [512, 1024, 2048], [256], 2

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "triton" if device == "cuda" else "cpu"
    info = describe()
    print(f"machine: {info['cpu']} ({info['cores']} cores, torch {info['torch']}, {info['torch_threads']} threads); "
          f"GPU: {info['gpu'] or 'none'}")
    rows = [measure(backend, args.batch, d, L, args.n, device, args.repeats) for d in args.d for L in args.L]
    report = dict(machine=info, device=device, sweep=rows, linearity=linearity(rows))

    if device == "cuda":
        peak = copy_bandwidth_GBps()
        for r in rows:
            r["fwd_frac_bw"], r["fwd_bwd_frac_bw"] = r["fwd_GBps"] / peak, r["fwd_bwd_GBps"] / peak
        report["device_copy_GBps"] = peak
        print_table(rows, extra_cols=("fwd_frac_bw", "fwd_bwd_frac_bw"))
    else:
        report["gpu"] = "no GPU on this machine: no GPU timing or bandwidth fraction exists for this run"
        print_table(rows)
        print(report["gpu"])

    print("\nlinearity (fwd+bwd ms per step, relative to the shortest L; 1.0 = linear):")
    for d, fit in report["linearity"].items():
        ratios = "  ".join(f"L={L}: {v:.2f}" for L, v in fit["per_step_vs_shortest"].items())
        print(f"  d={d}: {ratios}   fit: {fit['fit_ms_per_1k_steps']:.1f} ms per 1k steps "
              f"+ {fit['fit_intercept_ms']:.1f} ms, R^2 {fit['fit_r2']:.4f}")

    if device == "cpu" and not args.quick:
        # the target shape: fast path vs the sequential oracle, time and peak extra memory
        shape = dict(batch=4, d=512, L=512, n=16)
        fast = measure("cpu", **shape, device="cpu", repeats=args.repeats)
        ref = measure("ref", **shape, device="cpu", repeats=1, warmup=False)  # ~30 s: once is enough
        full_state_bytes = 4 * shape["batch"] * shape["d"] * shape["L"] * shape["n"]
        target = dict(shape=shape, cpu=fast, ref=ref, speedup_fwd=ref["fwd_ms"] / fast["fwd_ms"],
                      speedup_fwd_bwd=ref["fwd_bwd_ms"] / fast["fwd_bwd_ms"],
                      peak_extra_bytes_cpu=peak_extra_bytes("cpu", **shape),
                      peak_extra_bytes_ref=peak_extra_bytes("ref", **shape),
                      one_full_state_tensor_bytes=full_state_bytes)
        report["target"] = target
        print(f"\ntarget shape {shape}, fp32, fwd+bwd: cpu {fast['fwd_bwd_ms']:.1f} ms, oracle {ref['fwd_bwd_ms']:.0f} ms "
              f"-> {target['speedup_fwd_bwd']:.0f}x (forward alone {target['speedup_fwd']:.0f}x)")
        mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
        print(f"peak extra memory of one fwd+bwd: cpu {mib(target['peak_extra_bytes_cpu'])}, "
              f"oracle {mib(target['peak_extra_bytes_ref'])}; one (batch, d, L, n) fp32 tensor is {mib(full_state_bytes)}")

    name = f"scan_{'gpu' if device == 'cuda' else 'cpu'}{'_quick' if args.quick else ''}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
