"""Every Triton kernel compiles for the real GPUs (sm_80 and sm_90, fp32 and bf16 inputs) without spilling
registers and within the shared memory a block may have. The interpreter accepts code the compiler
rejects, and a kernel that spills runs at a fraction of its speed, so benchmarks/kernel_resources.py
lowers every launch the launch code makes (its dtypes, block sizes, flags and warps) to a cubin with
triton's bundled ptxas and reads the resources back: no GPU needed."""
import importlib
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssmforge.kernels.selective_scan import triton_available

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kernel_resources.py"
# shared memory a block may use, with opt-in (static + dynamic): A100 163 KiB, H100 227 KiB
SHARED_LIMIT = {"sm_80": 166_912, "sm_90": 232_448}


def _has_nvidia_toolchain() -> bool:
    if not triton_available():
        return False
    spec = importlib.util.find_spec("triton")
    bin_dir = Path(spec.origin).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


def _kernels() -> set[str]:
    """The public @triton.jit functions of ssmforge.kernels.triton: the kernels (helpers start with _).
    KernelInterface: JITFunction when compiling, InterpretedFunction under TRITON_INTERPRET."""
    import ssmforge.kernels.triton as package
    from triton.runtime.jit import KernelInterface

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {name for name, obj in vars(module).items() if isinstance(obj, KernelInterface)
                  and not name.startswith("_") and obj.fn.__module__ == module.__name__}
    return names


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_toolchain(), reason="triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
def test_every_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    output = tmp_path / "kernel_resources.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--output", str(output)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(output.read_text())

    kernels = _kernels()
    assert kernels and set(result["kernels"]) == kernels
    compiled = {(r["kernel"], r["arch"], r["dtype"]) for r in result["rows"]}
    uncompiled = [f"{k} {arch} {dtype}" for k in sorted(kernels) for arch in ("sm_80", "sm_90")
                  for dtype in ("fp32", "bf16") if (k, arch, dtype) not in compiled]
    assert not uncompiled, "no launch of these in benchmarks/kernel_resources.py's drives:\n" + "\n".join(uncompiled)

    failures = []
    for r in result["rows"]:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} ({r['drive']}: {r['variant']}, {r['num_warps']} warps)"
        # spills from triton's ptxas -v log: ptxas spills to the stack frame (cuobjdump's STACK, never LOCAL,
        # which counts .local variables)
        if r["spill_bytes"] or r["spill_loads"] or r["local"]:
            failures.append(f"{where}: spills registers ({r['registers']} used): {r['spill_bytes']} bytes stored, "
                            f"{r['spill_loads']} loaded, stack frame {r['stack']}, local {r['local']}")
        if r["shared"] > SHARED_LIMIT[r["arch"]]:
            failures.append(f"{where}: {r['shared']} bytes of shared memory > {SHARED_LIMIT[r['arch']]}")
    assert not failures, "\n".join(failures)
