"""Compile the C kernels (the scan of `scan_source` and the conv of `conv_source`, one library) once
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
from .scan_source import C_SOURCE as SCAN_SOURCE

log = logging.getLogger(__name__)

C_SOURCE = SCAN_SOURCE + CONV_SOURCE  # the scan's part holds the #includes

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11"]
# Linking is a separate step without -ffast-math: linked with it, gcc adds crtfastmath.o, whose
# constructor turns on flush-to-zero for the whole process when the library loads.
LINK_FLAGS = ["-shared", "-fopenmp"]


class ScanArgs(ctypes.Structure):
    """Mirror of the C `scan_args` struct."""
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "dim", "L", "n", "groups", "chunk", "n_chunks")] + [
        (name, ctypes.c_void_p) for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    ] + [(name, ctypes.c_int) for name in ("B_fixed", "C_fixed", "softplus")]


class ConvArgs(ctypes.Structure):
    """Mirror of the C `conv_args` struct."""
    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "L", "dim", "width", "x_sb", "x_sl")] + [
        (name, ctypes.c_void_p) for name in ("x", "w", "bias")] + [("silu", ctypes.c_int)]


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


@functools.lru_cache(maxsize=None)
def load_library() -> ctypes.CDLL | None:
    """The compiled scan library, or None (with a warning) when it cannot be built here."""
    key = hashlib.sha256("\n".join([C_SOURCE, *FLAGS, *LINK_FLAGS, _cpu_model()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_scan_{key}.so"
    try:
        if not target.exists():
            _compile(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("fused CPU kernels unavailable, falling back to PyTorch (chunked scan, torch conv): %s", detail)
        return None
    ptr = ctypes.c_void_p
    lib.scan_fwd.argtypes = [ctypes.POINTER(ScanArgs), ptr, ptr, ptr, ctypes.c_int]
    lib.scan_bwd.argtypes = [ctypes.POINTER(ScanArgs)] + [ptr] * 11 + [ctypes.c_int]
    lib.conv_fwd.argtypes = [ctypes.POINTER(ConvArgs), ptr, ctypes.c_int]
    lib.conv_bwd.argtypes = [ctypes.POINTER(ConvArgs)] + [ptr] * 5 + [ctypes.c_int]
    lib.scan_fwd.restype = lib.scan_bwd.restype = lib.conv_fwd.restype = lib.conv_bwd.restype = None
    return lib
