"""Registers, spills and shared memory of every Triton kernel, compiled for sm_80 and sm_90 without a GPU.

The launch code is run for real on small CPU tensors, with each kernel's launch intercepted: what it
would have passed (tensors of the dtypes it really passes, ints, the constexpr block sizes and flags it
derives from the shapes, num_warps / num_stages) goes through triton's own argument binder and
specialization, then `triton.compile` for each architecture (triton's bundled ptxas), and
`cuobjdump --dump-resource-usage` reads the cubin (REG, STACK, SHARED, LOCAL) while triton's own
`ptxas -v` log gives the spills: ptxas spills registers to the stack frame (STACK), and cuobjdump's
LOCAL counts only .local variables, which triton never declares. Shapes are the model configs' defaults (Mamba
d_state 16, d_conv 4; Mamba-2 d_state 128, headdim 64, chunk_size 256), which fix the block sizes.

dtype "bf16" is what the mixers pass under bf16 autocast: activations (u, delta, z, B, C, x, dt and
their output and gradient) bf16, parameters (A, D, biases, conv weights) fp32; "fp32" is all fp32.
Drives: "train" is what a mixer launches in a training step (every optional input the mixers give,
no state in or out); "flags" turns on the other branches (fixed B/C, a final-state gradient, an
initial state, deterministic mode; the conv without bias or SiLU is strictly lighter and left out).

A spill (spill stores or loads, or LOCAL > 0) or shared memory (static + dynamic) above the
architecture's per-block limit is marked in bold in the table and fails --check, naming kernel, arch
and dtype. tests/kernels/test_triton_compile.py runs this script.

    python benchmarks/kernel_resources.py            # table; writes benchmarks/results/kernel_resources.json
    python benchmarks/kernel_resources.py --check    # exit 1 on a spill or too much shared memory
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU: must be unset before triton is imported
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # triton prints ptxas -v: registers and spill stores/loads

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = (80, 90)
# opt-in maximum of shared memory per block (CUDA programming guide, compute capabilities table)
SHARED_LIMIT = {80: 166_912, 90: 232_448}
DTYPES = ("fp32", "bf16")
SCAN_CHUNK = None  # the selective scan's checkpoint interval to compile at (--scan-chunk); None: the launcher's
D_MODEL = 768  # the block sizes depend on d_inner only through its divisibility by 8 (scan BLOCK_D)
RESULTS = ROOT / "benchmarks" / "results" / "kernel_resources.json"


def kernel_modules():
    """Every module of ssmforge.kernels.triton (imported)."""
    import ssmforge.kernels.triton as package

    return [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def all_kernels() -> dict:
    """name -> JITFunction for every public @triton.jit function defined in ssmforge.kernels.triton:
    the kernels (helpers called from kernels start with an underscore)."""
    from triton.runtime.jit import JITFunction

    found = {}
    for module in kernel_modules():
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and not name.startswith("_") and obj.fn.__module__ == module.__name__:
                found[name] = obj
    return found


class Recorder:
    """Stands in for the launches: kernel[grid](*args, **kwargs) records (kernel, args, kwargs)."""

    def __init__(self, kernels: dict):
        self.kernels = kernels
        self.launches: list[tuple[str, tuple, dict]] = []

    def __enter__(self):
        for name, kernel in self.kernels.items():
            kernel.run = (lambda name: lambda *args, grid, warmup, **kwargs:
                          self.launches.append((name, args, kwargs)))(name)
        return self

    def __exit__(self, *exc):
        for kernel in self.kernels.values():
            del kernel.run  # back to the class's run


def _tensors(act):
    """Factories: activations in `act`, parameters fp32."""
    import torch

    g = torch.Generator().manual_seed(0)

    def activation(*shape):
        return torch.randn(*shape, generator=g).to(act).requires_grad_()

    def param(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    return activation, param


def _backward(*outputs):
    import torch

    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


def drive_selective_scan(act, flags: bool):
    """Mamba: u, delta, z, B, C (batch, n, L) activations; A, D, delta_bias fp32; softplus. A training step
    on rows of one document and on packed rows (seq_idx, two documents per row: HAS_SEQ_IDX)."""
    import torch

    from ssmforge.kernels.triton.selective_scan import CHUNK, selective_scan_triton
    from ssmforge.models.config import MambaConfig

    cfg = MambaConfig()
    activation, param = _tensors(act)
    chunk = SCAN_CHUNK or CHUNK
    batch, d, n, L = 1, cfg.expand * D_MODEL, cfg.d_state, 2 * chunk
    packed = (torch.arange(L) >= L // 3).to(torch.int32).expand(batch, L)
    for seq_idx in (None, packed):
        A = (-torch.rand(d, n)).requires_grad_()
        B, C = (param(d, n), param(d, n)) if flags else (activation(batch, n, L), activation(batch, n, L))
        out = selective_scan_triton(activation(batch, d, L), activation(batch, d, L), A, B, C, D=param(d),
                                    z=activation(batch, d, L), delta_bias=param(d), delta_softplus=True,
                                    return_last_state=flags, chunk=chunk, seq_idx=seq_idx)
        _backward(*(out if flags else (out,)))


def drive_ssd(act, flags: bool):
    """Mamba-2: x (batch, L, nheads, headdim), dt, B, C (batch, L, ngroups, d_state) activations; A, D,
    dt_bias fp32; softplus; with flags, an initial state and the final state's gradient. Each twice: one
    document per row, and a packed row with document resets (seq_idx: HAS_SEQ_IDX), one inside a chunk and
    one at a chunk boundary."""
    import torch

    from ssmforge.kernels.triton.ssd import ssd_triton
    from ssmforge.models.config import Mamba2Config

    cfg = Mamba2Config()
    activation, param = _tensors(act)
    nheads = cfg.expand * D_MODEL // cfg.headdim
    batch, L = 1, cfg.chunk_size * 2
    packed = torch.repeat_interleave(torch.arange(3), torch.tensor([cfg.chunk_size // 3, cfg.chunk_size
                                                                    - cfg.chunk_size // 3, cfg.chunk_size]))
    for seq_idx in (None, packed.expand(batch, L)):
        B, C = activation(batch, L, cfg.ngroups, cfg.d_state), activation(batch, L, cfg.ngroups, cfg.d_state)
        initial = param(batch, nheads, cfg.headdim, cfg.d_state) if flags else None
        out = ssd_triton(activation(batch, L, nheads, cfg.headdim), activation(batch, L, nheads),
                         (-torch.rand(nheads)).requires_grad_(), B, C, chunk_size=cfg.chunk_size, D=param(nheads),
                         dt_bias=param(nheads), dt_softplus=True, initial_state=initial, return_final_state=flags,
                         seq_idx=seq_idx)
        _backward(*(out if flags else (out,)))


def drive_conv1d(act, flags: bool):
    """Both mixers' conv: x (batch, d, L) activations, weight (d, d_conv) and bias fp32, SiLU; with flags,
    document resets (seq_idx: the HAS_SEQ_IDX variants). No bias or no SiLU only removes work."""
    import torch

    from ssmforge.kernels.triton.conv1d import BLOCK_L, causal_conv1d_triton
    from ssmforge.models.config import MambaConfig

    cfg = MambaConfig()
    activation, param = _tensors(act)
    d, L = cfg.expand * D_MODEL, 2 * BLOCK_L
    seq_idx = (torch.arange(L) // 37).to(torch.int32)[None] if flags else None  # documents of 37 steps
    _backward(causal_conv1d_triton(activation(1, d, L), param(d, cfg.d_conv), param(d), "silu", seq_idx=seq_idx))


def drive_vandermonde(act, flags: bool):
    """The diagonal SSMs' kernel (S4D, DSS, H3, GSS): w, dt_lam (H, N) complex64 whatever the activations (the
    SSM parameters stay fp32 under bf16), GSS's d_state 512 modes; forward and backward. With flags, the state
    summary of a carried state (its forward: the backward kernel without the dt_lam half) and its backward."""
    import torch

    from ssmforge.kernels.triton.vandermonde import BLOCK_L, vandermonde_summary_triton, vandermonde_triton

    g = torch.Generator().manual_seed(0)
    H, N = 16, 512

    def complex_param(real_scale):
        return torch.complex(torch.randn(H, N, generator=g) * real_scale, torch.randn(H, N, generator=g))

    w, dt_lam = complex_param(1.0).requires_grad_(), complex_param(0.0).requires_grad_()
    if flags:
        inputs = torch.randn(2, H, 2 * BLOCK_L, generator=g).requires_grad_()  # (batch, H, L), as the model folds it
        _backward(vandermonde_summary_triton(inputs.transpose(0, 1), dt_lam - 0.01).abs())
    else:
        _backward(vandermonde_triton(w, dt_lam - 0.01, 2 * BLOCK_L))


def drive_cauchy(act, flags: bool):
    """S4's Cauchy sums (S4, Liquid-S4): four numerator rows, d_state 64 poles, the L/2 + 1 nodes of L 256, all
    complex128 whatever the activations (S4 builds its kernel in float64); forward and backward. No flags."""
    import torch

    from ssmforge.kernels.triton.cauchy import cauchy_triton

    g = torch.Generator().manual_seed(0)
    H, J, N, K = 16, 4, 64, 129

    def complex_param(*shape):
        return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64),
                             torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    _backward(cauchy_triton(complex_param(H, J, N), complex_param(H, N), complex_param(K).detach(),
                            complex_param(H, K)).abs())


def drive_linear_scan(act, flags: bool):
    """The LRU's scan: a and b (batch, L, N) complex64 whatever the activations (the LRU runs its recurrence in
    float32), the default d_state 256, `a` one lambda for the batch expanded over time (no document resets); with
    flags, `a` per row and real inputs (the COMPLEX=False variants). Forward and backward."""
    import torch

    from ssmforge.kernels.triton.linear_scan import BLOCK_L, linear_scan_triton
    from ssmforge.models.config import LRUConfig

    g = torch.Generator().manual_seed(0)
    batch, L, N = 2, 2 * BLOCK_L, LRUConfig().d_state

    def inputs(rows, dtype):
        return (torch.randn(rows, L, N, generator=g, dtype=dtype) * 0.5).requires_grad_()

    if not flags:  # lambda (N,) expanded over time, as the LRU passes it
        lam = (torch.randn(N, generator=g, dtype=torch.complex64) * 0.5).requires_grad_()
        _backward(linear_scan_triton(lam.expand(1, L, N), inputs(batch, torch.complex64)).abs())
    else:
        _backward(linear_scan_triton(inputs(batch, torch.float32), inputs(batch, torch.float32)))


DRIVES = (drive_selective_scan, drive_ssd, drive_conv1d, drive_vandermonde, drive_cauchy, drive_linear_scan)



@contextlib.contextmanager
def _deterministic(enabled: bool):
    """torch's deterministic mode, which the kernels follow (ssmforge.kernels.deterministic)."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def record_launches(dtypes=DTYPES, flags=(False, True)) -> list[dict]:
    """Every distinct launch of the drives: dict(kernel, dtype, drive, args, kwargs)."""
    import torch

    kernels = all_kernels()
    launches, seen = [], set()
    for dtype in dtypes:
        act = dict(fp32=torch.float32, bf16=torch.bfloat16)[dtype]
        for with_flags in flags:
            with Recorder(kernels) as recorder, _deterministic(with_flags):
                for drive in DRIVES:
                    drive(act, with_flags)
            for name, args, kwargs in recorder.launches:
                key = (name, dtype, _signature_key(args, kwargs))
                if key not in seen:
                    seen.add(key)
                    launches.append(dict(kernel=name, dtype=dtype, drive="flags" if with_flags else "train",
                                         args=args, kwargs=kwargs))
    return launches


def _signature_key(args, kwargs) -> tuple:
    import torch

    def one(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", str(a.dtype))
        return ("int", a >= 2**31, a == 1, a % 16 == 0) if isinstance(a, int) and not isinstance(a, bool) else a
    return tuple(one(a) for a in args) + tuple(sorted((k, str(v)) for k, v in kwargs.items()))


def compile_launch(kernel, args, kwargs, arch: int):
    """Lower one launch for sm_<arch> as the launcher would: triton's binder decides the signature
    (pointer dtypes, i32/i64), the specializations and the options (num_warps, num_stages).
    -> (compiled kernel, options, triton's ptxas -v log; empty when triton's cache answered)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, options, log.getvalue()


def ptxas_spills(log: str) -> dict:
    """Stack frame and spill stores/loads from a ptxas -v log. ptxas spills registers to the stack frame
    (local memory), which cuobjdump lists as STACK, not LOCAL: LOCAL counts only .local variables."""
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not found:
        raise RuntimeError(f"no spill figures in the ptxas log:\n{log}")
    return dict(zip(("stack_frame", "spill_stores", "spill_loads"), map(int, found.groups())))


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the cubin's (one) function, from cuobjdump --dump-resource-usage."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if set(fields) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return {k.lower(): int(v) for k, v in fields.items()}


def _variant(kernel, args, kwargs) -> str:
    """The launch's constexprs, flags on by name, and the int arguments triton specializes as constants
    (those equal to 1): 'HAS_D HAS_Z BLOCK_D=8 ngroups=1'."""
    parts = []
    for k, v in kwargs.items():
        if k in ("num_warps", "num_stages"):
            continue
        if isinstance(v, bool):
            if v:
                parts.append(k)
        else:
            parts.append(f"{k}={v}")
    parts += [f"{name}=1" for name, v in zip(kernel.arg_names, args) if isinstance(v, int) and v == 1]
    return " ".join(parts)


def measure(archs=ARCHS, dtypes=DTYPES, flags=(False, True), progress=True) -> dict:
    import triton

    kernels = all_kernels()
    start = time.perf_counter()
    launches = record_launches(dtypes, flags)
    rows, compiled_once, spills_of = [], {}, {}
    for launch in launches:
        for arch in archs:
            key = (launch["kernel"], arch, _signature_key(launch["args"], launch["kwargs"]))
            if key not in compiled_once:  # a bf16 run that passes the same pointers as fp32 (all-fp32 kernels)
                t0 = time.perf_counter()
                compiled, options, log = compile_launch(kernels[launch["kernel"]], launch["args"],
                                                        launch["kwargs"], arch)
                cubin = compiled.asm["cubin"]
                digest = hashlib.sha256(cubin).hexdigest()
                if log:
                    spills_of[digest] = ptxas_spills(log)
                usage = resource_usage(cubin)
                spills = spills_of[digest]  # no log: triton's cache gave a cubin compiled earlier in this run
                dynamic = compiled.metadata.shared  # triton's shared memory is dynamic; SHARED is the static part
                compiled_once[key] = dict(
                    registers=usage["reg"], spill_bytes=spills["spill_stores"], spill_loads=spills["spill_loads"],
                    stack=usage["stack"], local=usage["local"], static_shared=usage["shared"],
                    dynamic_shared=dynamic, shared=usage["shared"] + dynamic,
                    num_warps=options.num_warps, num_stages=options.num_stages,
                    compile_s=round(time.perf_counter() - t0, 2))
                if progress:
                    print(f"  {launch['kernel']} sm_{arch} {launch['dtype']} {launch['drive']}: "
                          f"{compiled_once[key]['compile_s']} s", file=sys.stderr, flush=True)
            row = dict(kernel=launch["kernel"], variant=_variant(kernels[launch["kernel"]], launch["args"], launch["kwargs"]), drive=launch["drive"],
                       arch=f"sm_{arch}", dtype=launch["dtype"], **compiled_once[key])
            row["problems"] = problems(row, arch)
            rows.append(row)
    rows.sort(key=lambda r: (r["kernel"], r["drive"] != "train", r["variant"], r["arch"], r["dtype"]))
    return dict(triton=triton.__version__, archs=[f"sm_{a}" for a in archs], dtypes=list(dtypes),
                shared_limit={f"sm_{a}": SHARED_LIMIT[a] for a in archs}, kernels=sorted(kernels),
                compilations=len(compiled_once), compile_seconds=round(time.perf_counter() - start, 1), rows=rows)


def problems(row: dict, arch: int) -> list[str]:
    found = []
    if row["spill_bytes"] or row["spill_loads"] or row["local"]:
        found.append(f"spills registers: {row['spill_bytes']} bytes stored, {row['spill_loads']} loaded, stack "
                     f"frame {row['stack']} bytes, local {row['local']} bytes")
    if row["shared"] > SHARED_LIMIT[arch]:
        found.append(f"{row['shared']} bytes of shared memory > {SHARED_LIMIT[arch]} (sm_{arch} limit)")
    return found


def missing(result: dict) -> list[str]:
    """Kernels without a row for some arch x dtype: a kernel no drive launches."""
    have = {(r["kernel"], r["arch"], r["dtype"]) for r in result["rows"]}
    return [f"{k} {a} {d}" for k in result["kernels"] for a in result["archs"] for d in result["dtypes"]
            if (k, a, d) not in have]


def table(result: dict) -> str:
    """Markdown, one row per launch and arch; failing figures in bold."""
    lines = ["| kernel | variant | arch | dtype | warps/stages | registers | spill bytes | shared memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        spills = f"{r['spill_bytes']}" + (f" / {r['spill_loads']} loaded" if r["spill_loads"] else "")
        spills = f"**{spills}**" if r["spill_bytes"] or r["spill_loads"] or r["local"] else spills
        shared = f"{r['shared']:,}"
        shared = f"**{shared}**" if r["shared"] > result["shared_limit"][r["arch"]] else shared
        lines.append(f"| {r['kernel']} | {r['drive']}: {r['variant']} | {r['arch']} | {r['dtype']} | "
                     f"{r['num_warps']}/{r['num_stages']} | {r['registers']} | {spills} | {shared} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--train-only", action="store_true", help="only the launches of a training step")
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill, too much shared memory or a "
                        "kernel left uncompiled")
    parser.add_argument("--scan-chunk", type=int, help="compile the selective scan at this checkpoint interval "
                        "instead of the launcher's (the registers it costs: see the README)")
    args = parser.parse_args(argv)
    global SCAN_CHUNK
    SCAN_CHUNK = args.scan_chunk
    with tempfile.TemporaryDirectory() as fresh:
        os.environ["TRITON_CACHE_DIR"] = fresh  # compile everything: triton's ptxas log comes only from a compile
        result = measure(args.arch, args.dtype, (False,) if args.train_only else (False, True))
    from benchmarks.machine import describe

    result["machine"] = describe()
    print(table(result))
    print(f"\n{result['compilations']} compilations of {len(result['kernels'])} kernels in "
          f"{result['compile_seconds']} s")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    failures = [f"{r['kernel']} ({r['drive']}: {r['variant']}) {r['arch']} {r['dtype']}: {p}"
                for r in result["rows"] for p in r["problems"]]
    failures += [f"{m}: not compiled (no drive launches it)" for m in missing(result)]
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
