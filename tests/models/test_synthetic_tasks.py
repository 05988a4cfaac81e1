"""The synthetic-task generators of benchmarks/synthetic.py, checked by reading each sample back by hand."""
import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "synthetic.py"


def load_script():
    spec = importlib.util.spec_from_file_location("synthetic_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selective_copying_targets_are_the_data_tokens_in_order():
    synthetic = load_script()
    region, k, n_data = 20, 5, 6
    ids, targets = synthetic.selective_copying_batch(64, region, k, n_data, torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (64, region + k)
    positions_seen = set()
    for row, target in zip(ids.tolist(), targets.tolist()):
        data = [(t, token) for t, token in enumerate(row[:region]) if token != 0]
        assert len(data) == k and all(1 <= token <= n_data for _, token in data)
        positions_seen.update(t for t, _ in data)
        assert row[region:] == [n_data + 1] * k  # the markers
        assert target[region:] == [token for _, token in data]  # in order of appearance
        assert target[:region] == [-100] * region  # nothing else scored
    assert len(positions_seen) > region * 3 // 4  # positions vary over the region


def test_induction_heads_target_is_the_token_after_the_first_special():
    synthetic = load_script()
    vocab, length = 8, 30
    ids, targets = synthetic.induction_heads_batch(64, length, vocab, torch.Generator().manual_seed(1))
    assert ids.shape == targets.shape == (64, length)
    firsts = set()
    for row, target in zip(ids.tolist(), targets.tolist()):
        specials = [t for t, token in enumerate(row) if token == vocab]
        assert len(specials) == 2 and specials[1] == length - 1 and specials[0] <= length - 3
        firsts.add(specials[0])
        assert all(0 <= token < vocab for t, token in enumerate(row) if t not in specials)
        assert target == [-100] * (length - 1) + [row[specials[0] + 1]]
    assert len(firsts) > 10
