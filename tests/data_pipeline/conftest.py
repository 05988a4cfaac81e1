import json
import random

import pytest

WORDS = "the quick brown fox jumps over a lazy dog while state space models scan long sequences".split()


def write_jsonl(path, n, seed=0, field="text"):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return docs


@pytest.fixture
def corpus(tmp_path):
    """A local jsonl corpus of 400 documents and the texts it holds."""
    docs = write_jsonl(tmp_path / "corpus.jsonl", 400)
    return tmp_path / "corpus.jsonl", docs


def run_config(tmp_path, paths, *overrides):
    from ssmforge.pretrain.config import load_config

    sources = json.dumps([{"kind": "local", "paths": [str(p) for p in paths]}])
    return load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.sources={sources}", "data.seq_len=32",
                              "data.val_fraction=0.1", "model.vocab_size=260", "data.tokenize_workers=2",
                              *overrides])
