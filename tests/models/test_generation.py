"""Sampling rules of sample_next, checked on hand-made logits."""
import pytest
import torch

from ssmforge.errors import ConfigError

from ssmforge.models import sample_next


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(1)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p 0.7: tokens 0 (0.5) and 1 (mass above it 0.5 < 0.7) stay; token 2 (0.8 above) goes
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    counts = torch.bincount(sample_next(logits, generator=g), minlength=4).float() / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_temperature_sharpens():
    logits = torch.log(torch.tensor([[0.6, 0.4]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(2)
    cold = sample_next(logits, temperature=0.25, generator=g).float().mean().item()
    # p(1) at T=0.25 is 0.4^4 / (0.6^4 + 0.4^4) = 0.165
    assert abs(cold - 0.165) < 0.03


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_sampling_arguments(kwargs):
    with pytest.raises(ConfigError):
        sample_next(torch.zeros(1, 3), **kwargs)
