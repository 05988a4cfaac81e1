import sys
from pathlib import Path

import pytest
import torch

from ..conftest import seed_kernel_cache

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SSMFORGE_CACHE_DIR", str(seed_kernel_cache(tmp_path_factory.getbasetemp() / "ssmforge-cache")))


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory):
    """A tiny random Mamba saved as a model folder with the byte tokenizer (what `ssmforge export` writes)."""
    from ssmforge.models import LanguageModel, MambaConfig, ModelConfig, save_pretrained

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(d_model=32, n_layer=2, vocab_size=260, mamba=MambaConfig(d_state=8)))
    out = tmp_path_factory.mktemp("model")
    save_pretrained(model, out, token_ids={"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
                    byte_tokenizer=True)
    return out


def ssmforge(*args) -> list[str]:
    return [sys.executable, "-m", "ssmforge", *map(str, args)]
