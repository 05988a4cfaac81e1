"""Compile the C kernels (the scan of `scan_source`, the conv of `conv_source` and the linear scan of
`linear_scan_source`, one library) once
per machine and load it with ctypes.

No torch headers are involved, so the build takes about a second with the system C compiler (the
README's set-up installs one: build-essential). The shared library is cached under
`cache_dir()`, keyed by the source, the flags and the CPU model,
since -march=native code must not move to another processor.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .conv_source import CONV_SOURCE
from .linear_scan_source import LINEAR_SCAN_SOURCE
from .scan_source import C_SOURCE as SCAN_SOURCE

log = logging.getLogger(__name__)

C_SOURCE = SCAN_SOURCE + CONV_SOURCE + LINEAR_SCAN_SOURCE  # the scan's part holds the #includes

# -ffast-math for libmvec's vector expf/logf and for contracted multiply-adds; -fno-associative-math so
# that the kernels' exp keeps its reduction and polynomial in the order written.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-associative-math", "-fopenmp", "-fPIC", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # GCC's loops use 256-bit vectors on AVX-512 CPUs unless told
# Linking is a separate step without -ffast-math: linked with it, gcc adds crtfastmath.o, whose
# constructor turns on flush-to-zero for the whole process when the library loads.
LINK_FLAGS = ["-shared", "-fopenmp"]


def pointer(t) -> ctypes.c_void_p | None:
    """A tensor's data as a C pointer argument; None (NULL) for None."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class LinearScanArgs(ctypes.Structure):
    """Mirror of the C `linear_scan_args` struct."""
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "L", "N", "a_sb", "a_sl")]


class Tensor3(ctypes.Structure):
    """Mirror of the C `tensor3` struct: a (batch, d, L) fp32 tensor's data and strides (elements)."""
    _fields_ = [("p", ctypes.c_void_p), ("sb", ctypes.c_int64), ("sd", ctypes.c_int64), ("sl", ctypes.c_int64)]

    @classmethod
    def of(cls, t) -> "Tensor3":
        """The view of tensor t (batch, d, L), or an empty one (NULL data) for None."""
        return cls() if t is None else cls(t.data_ptr(), *t.stride())


class ScanArgs(ctypes.Structure):
    """Mirror of the C `scan_args` struct."""
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "dim", "L", "n", "groups", "chunk", "n_chunks")] + [
        (name, Tensor3) for name in ("u", "delta", "z")] + [
        (name, ctypes.c_void_p) for name in ("A", "B", "C", "D", "delta_bias", "seq_idx")
    ] + [(name, ctypes.c_int) for name in ("B_fixed", "C_fixed", "softplus")]


class ConvArgs(ctypes.Structure):
    """Mirror of the C `conv_args` struct (seq_idx: an int32 (batch, L) pointer, or None)."""
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "L", "dim", "width", "x_sb", "x_sl")] + [
        (name, ctypes.c_void_p) for name in ("x", "w", "bias")] + [("silu", ctypes.c_int), ("seq_idx", ctypes.c_void_p)]


def _cpu_model() -> str:
    """Model name and instruction-set flags: what -march=native depends on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and ARM spellings
    first = {}
    for line in lines:
        key = line.split(":", 1)[0].strip()
        if key in wanted:
            first.setdefault(key, line)
    return platform.machine() + "\n".join(first.values())


def cache_dir() -> Path:
    """Where ssmforge keeps per-machine caches: $SSMFORGE_CACHE_DIR, else $XDG_CACHE_HOME/ssmforge,
    else ~/.cache/ssmforge."""
    if os.environ.get("SSMFORGE_CACHE_DIR"):
        return Path(os.environ["SSMFORGE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssmforge"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (install build-essential)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "scan.c"
        src.write_text(C_SOURCE)
        obj, built = Path(tmp) / "scan.o", Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, "-c", str(src), "-o", str(obj)], check=True, capture_output=True, text=True)
        subprocess.run([compiler, *LINK_FLAGS, str(obj), "-o", str(built), "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(built, target)  # atomic: concurrent ranks never load a half-written file


def library_file(folder: Path | None = None) -> Path:
    """Where the library built from this source, with these flags, for this CPU lives: in `folder`, else in
    cache_dir()."""
    key = hashlib.sha256("\n".join([C_SOURCE, *FLAGS, *LINK_FLAGS, _cpu_model()]).encode()).hexdigest()[:16]
    return (folder or cache_dir()) / f"cpu_scan_{key}.so"


def build_library(target: Path) -> Path:
    """Compile the library to `target` unless it is there already; returns target."""
    if not target.exists():
        _compile(target)
    return target


@functools.lru_cache(maxsize=None)
def load_library() -> ctypes.CDLL | None:
    """The compiled scan library, or None (with a warning) when it cannot be built here."""
    try:
        lib = ctypes.CDLL(str(build_library(library_file())))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("fused CPU kernels unavailable, falling back to PyTorch (chunked scan, torch conv): %s", detail)
        return None
    ptr = ctypes.c_void_p
    tensor3 = ctypes.POINTER(Tensor3)
    lib.scan_fwd.argtypes = [ctypes.POINTER(ScanArgs), tensor3, ptr, ptr, ctypes.c_int]
    lib.scan_bwd.argtypes = [ctypes.POINTER(ScanArgs), ptr, tensor3, ptr, tensor3, tensor3, tensor3] + [ptr] * 5 + [
        ctypes.c_int]
    lib.conv_fwd.argtypes = [ctypes.POINTER(ConvArgs), ptr, ctypes.c_int]
    lib.conv_bwd.argtypes = [ctypes.POINTER(ConvArgs)] + [ptr] * 4 + [ctypes.c_int]
    lib.scan_fwd.restype = lib.scan_bwd.restype = lib.conv_fwd.restype = lib.conv_bwd.restype = None
    for real in ("float", "double"):
        forward, backward = getattr(lib, f"linear_scan_fwd_{real}"), getattr(lib, f"linear_scan_bwd_{real}")
        forward.argtypes = [ctypes.POINTER(LinearScanArgs)] + [ptr] * 3 + [ctypes.c_int]
        backward.argtypes = [ctypes.POINTER(LinearScanArgs)] + [ptr] * 5 + [ctypes.c_int]
        forward.restype = backward.restype = None
    return lib


def cpu_kernels_available() -> bool:
    """Whether the C kernels can run here (else the callers fall back to PyTorch)."""
    return load_library() is not None


# torch.compile takes the answer as a constant rather than trace the build: what
# torch.compiler.assume_constant_result sets, without importing torch._dynamo (which imports triton).
cpu_kernels_available._dynamo_marked_constant = True
