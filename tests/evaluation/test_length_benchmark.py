"""benchmarks/length.py at a tiny size: every family trains, is scored on long documents through the chunked
recurrent path, and the JSON holds the four position buckets with the right token counts and finite numbers."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from .conftest import ROOT


def length_module():
    sys.path.insert(0, str(ROOT))
    import benchmarks.length as module

    return module


def test_documents_state_pairs_early_and_query_them_to_the_end():
    L = length_module()
    source = L.RecallSource(n_pairs=4, run=(4, 8))
    ids, nats, recall = source.document(3000, np.random.default_rng(0))
    assert len(ids) == len(nats) == len(recall) == 3000 and ids[0] == L.EOS and ids[1] == L.STORE
    memory = {int(ids[2 + 2 * j]): int(ids[3 + 2 * j]) for j in range(4)}
    queries = [i for i in range(len(ids) - 2) if ids[i] == L.QUERY]
    assert queries[-1] > 2900 and len(queries) > 200  # queried all along the document
    for i in queries:
        assert memory[int(ids[i + 1])] == ids[i + 2] and recall[i + 2] and nats[i + 2] == 0.0
    assert recall.sum() == len(queries)
    assert np.all(nats >= 0) and np.isfinite(nats).all()


def test_tiny_run_writes_every_bucket(tmp_path):
    L = length_module()
    threads = torch.get_num_threads()
    try:
        report = L.main(["--quick", "--steps", "2", "--eval-length", "2100", "--eval-docs", "2",
                         "--threads", str(threads), "--out", str(tmp_path / "length.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "length.json").read_text())
    assert saved["buckets"] == ["0-512", "512-2k", "2k-8k", "8k-32k"] == list(saved["entropy_floor_perplexity"])
    expected = {"0-512": 2 * 511, "512-2k": 2 * 1536, "2k-8k": 2 * 52, "8k-32k": 0}  # position 0 is given
    assert set(saved["results"]) | set(saved["skipped"]) == set(L.FAMILIES)
    assert set(saved["results"]) >= {"mamba", "transformer"}
    for family, result in saved["results"].items():
        for name, bucket in result["buckets"].items():
            assert bucket["tokens"] == expected[name], (family, name)
            if bucket["tokens"]:
                assert math.isfinite(bucket["token_perplexity"]) and bucket["token_perplexity"] > 1
                assert math.isfinite(bucket["floor_perplexity"]) and bucket["recalls"] > 0
                assert math.isfinite(bucket["recall_nats"])
            else:
                assert bucket["token_perplexity"] is None and bucket["recall_nats"] is None
    assert "| family |" in report["table"] and "entropy floor" in report["table"]
    if (tmp_path / "length.png").exists():
        assert (tmp_path / "length.png").stat().st_size > 0


@pytest.mark.parametrize("family", ["mamba", "transformer"])
def test_scoring_is_the_chunked_path_and_equals_one_forward(family):
    """The benchmark's scores come through eval-ppl's chunked recurrent path, equal to one forward."""
    import argparse

    L = length_module()
    model = L.build_model(family, argparse.Namespace(d_model=32, train_length=32))
    docs = [L.RecallSource().document(100, np.random.default_rng(i)) for i in range(2)]
    chunked, whole = L.score(model, docs, 32, 2), L.score(model, docs, 1000, 2)
    assert chunked.shape == (2, 100) and (chunked[:, 0] == 0).all()
    np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-5)
