"""The Triton kernels address (batch, ...) tensors with 64-bit offsets.

batch * d * L passes 2^31 at real shapes (8 x 4096 x 65536, or 16 x 8192 x 16384), and an offset such as
(pid_b * dim + offs_d) * L computed in int32 wraps around to another row or out of the tensor: silent
garbage or an illegal address, on the GPU only. A tensor that large cannot be run here, so the test reads
the kernels as the GPU compiler sees them: each is lowered to Triton IR for sm_90 (no GPU needed) and
every multiplication that involves the batch program id (program_id(0); the SSD's chunk index, its
remainder by n_chunks, is bounded and exempt) must be 64-bit. Widening the batch id before anything
multiplies it (`tl.program_id(0).to(tl.int64)`) passes; reverting it to int32 fails, which the first
test checks on a pair of toy kernels.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ssmforge.kernels.selective_scan import triton_available

LOWER = textwrap.dedent('''
    import inspect, json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ssmforge.kernels.triton import conv1d, scan_kernels, ssd_kernels

    @triton.jit
    def narrow(x_ptr, dim, L, BLOCK: tl.constexpr):  # the int32 offsets the test must reject
        row = tl.program_id(0) * dim + tl.arange(0, BLOCK)
        tl.store(x_ptr + row * L, 0.0)

    @triton.jit
    def wide(x_ptr, dim, L, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * dim + tl.arange(0, BLOCK)
        tl.store(x_ptr + row * L, 0.0)

    def ttir(kernel, constexprs):
        signature = {name: "constexpr" if name in constexprs else "*i32" if name in ("seq_ptr", "doc_ptr")
                     else "*fp32" if name.endswith("_ptr") else "i32" for name in inspect.signature(kernel.fn).parameters}
        keyed = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
        src = ASTSource(kernel, signature, constexprs=keyed)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ttir"]

    # document resets on: their loads (seq_idx per step, document numbers per chunk) are offsets to check too
    scan = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_SEQ_IDX=True, BLOCK_D=8, CHUNK=16, N=16)
    conv = dict(HAS_BIAS=True, HAS_SEQ_IDX=True, SILU=True, WIDTH=4, BLOCK_D=16, BLOCK_L=64)
    ssd = dict(CHUNK=64, BLOCK_P=64, BLOCK_N=16, PRECISION="tf32", HAS_SEQ_IDX=True)
    kernels = {
        "narrow": (narrow, dict(BLOCK=16)),
        "wide": (wide, dict(BLOCK=16)),
        "conv1d_fwd": (conv1d.conv1d_fwd_kernel, conv),
        "conv1d_grad_pre": (conv1d.conv1d_grad_pre_kernel, conv),
        "conv1d_grad_x": (conv1d.conv1d_grad_x_kernel, dict(WIDTH=4, HAS_SEQ_IDX=True, BLOCK_D=16, BLOCK_L=64)),
        "ssd_chunk_state": (ssd_kernels.chunk_state_kernel, dict(ssd, FROM_START=False, BLOCK_K=64)),
        "ssd_state_passing": (ssd_kernels.state_passing_kernel, dict(HAS_START=True, HAS_SEQ_IDX=True, REVERSE=True, CHUNK=64,
                                                                     BLOCK=1024)),
        "ssd_chunk_scan_fwd": (ssd_kernels.chunk_scan_fwd_kernel, dict(ssd, BLOCK_M=64)),
        "ssd_bwd_sources": (ssd_kernels.chunk_scan_bwd_sources_kernel, dict(ssd, BLOCK=32, DETERMINISTIC=True)),
        "ssd_bwd_outputs": (ssd_kernels.chunk_scan_bwd_outputs_kernel, dict(ssd, BLOCK=32, DETERMINISTIC=False)),
    }
    for fixed in (False, True):  # B/C fixed (d, n) or input-dependent: different address code
        kernels[f"scan_fwd_fixed={fixed}"] = (scan_kernels.scan_fwd_kernel, dict(scan, B_FIXED=fixed, C_FIXED=fixed))
    for det in (False, True):  # atomics into a group's rows, or partials per program
        kernels[f"scan_bwd_deterministic={det}"] = (scan_kernels.scan_bwd_kernel, dict(
            scan, B_FIXED=False, C_FIXED=False, HAS_DLAST=True, DETERMINISTIC=det))
    kernels["scan_bwd_fixed"] = (scan_kernels.scan_bwd_kernel, dict(scan, B_FIXED=True, C_FIXED=True, HAS_DLAST=True,
                                                                     DETERMINISTIC=False))
    json.dump({name: ttir(*k) for name, k in kernels.items()}, open(sys.argv[1], "w"))
''')

SSA = re.compile(r"%[\w.$-]+")
DEF = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*\"?([\w.]+)")
BOUNDED = {"arith.remsi", "arith.remui"}  # x % n is below the int32 n whatever x is


def batch_products(ttir: str) -> tuple[list[str], int]:
    """The int32 multiplications that involve the batch program id in a kernel's TTIR, and the number of
    64-bit ones. A value involves it when it is computed from `tt.get_program_id x`, through any op but a
    remainder, through scf.for iter_args and the scf.yield of a region into its op's results."""
    # without the trailing location (a function's header has locations inside, and ends with "{")
    lines = [line.rsplit(" loc(", 1)[0] if line.endswith(")") else line for line in ttir.splitlines()]
    tainted: set[str] = set()
    while True:
        before = len(tainted)
        regions: list[list[str]] = []  # per open region: the names its yields flow into
        for line in lines:
            names = [re.sub(r"#\d+$", "", s) for s in SSA.findall(line)]
            opens, closes = line.rstrip().endswith("{"), line.lstrip().startswith("}")
            m = DEF.match(line)
            if m:
                name, op = m.groups()
                if op == "tt.get_program_id" and " x " in line + " ":
                    tainted.add(name)
                elif op not in BOUNDED and any(s in tainted for s in names[1:]):
                    tainted.add(name)
                for block_arg, init in re.findall(r"(%[\w.$-]+) = (%[\w.$-]+)", line.partition("iter_args")[2]):
                    if init in tainted:
                        tainted.add(block_arg)
            if "scf.yield" in line and regions and any(s in tainted for s in names):
                tainted.update(regions[-1])
            if closes and not opens:
                regions.pop()
            elif opens and not closes:
                regions.append([m.group(1)] + re.findall(r"(%[\w.$-]+) = ", line.partition("iter_args")[2])
                               if m else [])
        if len(tainted) == before:
            break
    narrow, wide = [], 0
    for line in lines:
        m = DEF.match(line)
        if m and m.group(2) == "arith.muli" and m.group(1) in tainted:
            if "i64" in line.rpartition(" : ")[2]:
                wide += 1
            else:
                narrow.append(line.strip())
    return narrow, wide


def _has_nvidia_backend() -> bool:
    if not triton_available():
        return False
    import importlib.util

    root = Path(importlib.util.find_spec("triton").origin).parent
    return (root / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.fixture(scope="module")
def ttirs(tmp_path_factory) -> dict[str, str]:
    """kernel name -> its TTIR for sm_90, lowered in a subprocess without TRITON_INTERPRET."""
    folder = tmp_path_factory.mktemp("int64")
    script, out = folder / "lower.py", folder / "ttir.json"
    script.write_text(LOWER)  # a file, not -c: triton.jit reads the kernels' source
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _has_nvidia_backend(), reason="triton's NVIDIA backend is not installed")]


def test_the_check_tells_int32_from_int64_offsets(ttirs):
    narrow, _ = batch_products(ttirs["narrow"])
    assert narrow, "an int32 row * L went unnoticed"
    assert batch_products(ttirs["wide"]) == ([], 2)  # pid * dim and row * L


@pytest.mark.parametrize("kernel", [
    "scan_fwd_fixed=False", "scan_fwd_fixed=True", "scan_bwd_deterministic=False", "scan_bwd_deterministic=True",
    "scan_bwd_fixed",
    "conv1d_fwd", "conv1d_grad_pre", "conv1d_grad_x",
    "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan_fwd", "ssd_bwd_sources", "ssd_bwd_outputs",
])
def test_batch_offsets_are_64_bit(ttirs, kernel):
    narrow, wide = batch_products(ttirs[kernel])
    assert not narrow, f"{kernel} multiplies the batch index in int32:\n" + "\n".join(narrow)
    assert wide, f"{kernel}: no 64-bit product of the batch index found (is the check still reading the IR?)"
