"""Test-wide settings, applied before any test module imports torch or triton."""
import os
import shutil

# Triton kernels run on CPU tensors through the interpreter where no NVIDIA GPU is present.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_config():
    """A small Mamba config, fast enough for exact comparisons on CPU."""
    from ssmforge.models import MambaConfig, ModelConfig

    return ModelConfig(family="mamba", d_model=32, n_layer=2, vocab_size=101,
                       mamba=MambaConfig(d_state=8, d_conv=4, expand=2))
