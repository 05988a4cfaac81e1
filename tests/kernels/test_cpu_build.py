"""Loading the compiled CPU scan must not change the process's floating-point mode."""
import torch

from ssmforge.kernels.cpu.build import load_library

from ..conftest import seed_kernel_cache


def test_loading_the_library_keeps_subnormal_floats(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(seed_kernel_cache(tmp_path)))
    load_library.cache_clear()
    try:
        assert load_library() is not None
        tiny = torch.tensor([1e-40], dtype=torch.float32)  # a float32 subnormal
        assert (tiny * 1.0).item() > 0  # flush-to-zero would make it 0
    finally:
        load_library.cache_clear()
