"""Test-wide settings, applied before any test module imports torch or triton."""
import os
import shutil
import subprocess
from pathlib import Path

# Triton kernels run on CPU tensors through the interpreter where no NVIDIA GPU is present.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the processes a test starts (ranks, launchers, jobs): two cores are shared by two xdist workers and their
# ranks, where a second OpenMP thread per process only contends (torchrun sets the same for its ranks)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from ssmforge.kernels.cpu import build as _kernel_build  # noqa: E402

# where the tests that keep the default cache find the compiled CPU kernels (read before any test moves it)
SESSION_KERNEL_CACHE = _kernel_build.cache_dir()


def seed_kernel_cache(folder) -> Path:
    """`folder`, holding a copy of the compiled CPU kernels, for a test that keeps ssmforge's caches private:
    the compile takes about a minute on two cores, the copy a millisecond. Without a compiler the folder
    stays empty and the test sees the fallback it would see anyway."""
    folder = Path(folder)
    target = _kernel_build.library_file(folder)
    if not target.exists():
        try:
            source = _kernel_build.build_library(_kernel_build.library_file(SESSION_KERNEL_CACHE))
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        shutil.copyfile(source, partial)
        os.replace(partial, target)  # a concurrent process never loads half a file
    return folder


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """A crash dumps the crashing thread's stack only: with every thread's (pytest's default), the stack
    that matters can fall outside the part of a long log that is kept."""
    import faulthandler

    try:  # the stream pytest's faulthandler plugin writes to: a copy of stderr made before output capture
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        stream = config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):
        return
    faulthandler.enable(file=stream, all_threads=False)


@pytest.fixture
def tiny_config():
    """A small Mamba config, fast enough for exact comparisons on CPU."""
    from ssmforge.models import MambaConfig, ModelConfig

    return ModelConfig(family="mamba", d_model=32, n_layer=2, vocab_size=101,
                       mamba=MambaConfig(d_state=8, d_conv=4, expand=2))
