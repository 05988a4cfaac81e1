"""The LRU's linear scan (kernels.linear_scan): forward and forward+backward of every backend on this machine's
device, over a sweep of lengths at the LRU's layout (lambda of N states expanded over time, complex64 b).

On CPU it times the C kernel ("cpu", the default) against PyTorch's doubling scan ("ref"); on CUDA the Triton
kernel against "ref". Prints a table (ms, tokens/s, the speed-up over "ref") and writes JSON with the machine.

    python benchmarks/linear_scan.py            # default sweep, about a minute on 2 cores
    python benchmarks/linear_scan.py --quick    # seconds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ssmforge import kernels  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from benchmarks.scan import timed  # noqa: E402


def lru_inputs(batch: int, L: int, N: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda (N,) on the LRU's ring (|lambda| in [0.9, 0.999]) and b (batch, L, N) complex64, both requiring
    gradients."""
    g = torch.Generator().manual_seed(0)
    lam = torch.polar(0.9 + 0.099 * torch.rand(N, generator=g), torch.rand(N, generator=g) * 0.63)
    b = torch.complex(torch.randn(batch, L, N, generator=g), torch.randn(batch, L, N, generator=g))
    return lam.to(device).requires_grad_(), b.to(device).requires_grad_()


def measure(backend: str, batch: int, L: int, N: int, device: str, repeats: int) -> dict:
    lam, b = lru_inputs(batch, L, N, device)

    def fwd():
        with torch.no_grad():
            kernels.linear_scan(lam.expand(1, L, N), b, backend)

    def fwd_bwd():
        torch.view_as_real(kernels.linear_scan(lam.expand(1, L, N), b, backend)).sum().backward()

    t_f, t_fb = timed(fwd, repeats, device), timed(fwd_bwd, repeats, device)
    return dict(backend=backend, batch=batch, L=L, N=N, fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3,
                fwd_tokens_per_s=batch * L / t_f, fwd_bwd_tokens_per_s=batch * L / t_fb)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two short lengths")
    p.add_argument("--L", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--N", type=int, default=256, help="complex states (the LRU's d_state)")
    p.add_argument("--repeats", type=int, default=5, help="best of this many runs (the machine may be shared)")
    p.add_argument("--threads", type=int, default=None, help="torch (and C kernel) threads; default torch's")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/linear_scan_{cpu,gpu}[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.L, args.repeats = [256, 1024], 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = kernels.linear_scan_default_backend(torch.device(device))
    if fused == "ref":
        raise SystemExit(f"no fused linear scan for {device} here (the default backend is ref): nothing to compare")
    info = describe()
    print(f"machine: {info['cpu']} ({info['cores']} cores, torch {info['torch']}, {info['torch_threads']} threads); "
          f"GPU: {info['gpu'] or 'none'}")
    rows = []
    print(f"{'backend':>8} {'batch':>5} {'L':>6} {'N':>5} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd+bwd tok/s':>14} "
          f"{'vs ref':>7}")
    for L in args.L:
        ref = measure("ref", args.batch, L, args.N, device, args.repeats)
        fast = measure(fused, args.batch, L, args.N, device, args.repeats)
        fast["fwd_bwd_speedup_over_ref"] = ref["fwd_bwd_ms"] / fast["fwd_bwd_ms"]
        for r in (ref, fast):
            print(f"{r['backend']:>8} {r['batch']:>5} {r['L']:>6} {r['N']:>5} {r['fwd_ms']:>9.2f} "
                  f"{r['fwd_bwd_ms']:>11.2f} {r['fwd_bwd_tokens_per_s']:>14,.0f} "
                  f"{r.get('fwd_bwd_speedup_over_ref', 1.0):>6.1f}x")
        rows += [ref, fast]
    out = args.out or ROOT / "benchmarks" / "results" / \
        f"linear_scan_{'gpu' if device == 'cuda' else 'cpu'}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=info, device=device, fused=fused, sweep=rows), indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
