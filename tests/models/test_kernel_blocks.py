"""SSM kernels built a block of channels at a time (models.layers.recomputed_by_channels): the same values and
gradients as one call over every channel, and a training step's peak memory bounded by one block's work rather
than the whole layer's, measured by torch's memory tracker (the one `ssmforge plan` uses)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from ssmforge.models import LanguageModel, layers

from .contracts import model_config


def channelwise(x: torch.Tensor, y: torch.Tensor, length: int) -> torch.Tensor:
    """A stand-in kernel: channels independent, a (channels, length) result."""
    steps = torch.arange(length, dtype=x.dtype)
    return (x[:, :, None] * torch.cos(y[:, :, None] * steps)).sum(1)


def test_ragged_blocks_equal_one_call_values_and_gradients(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, 11, generator=g, dtype=torch.float64)
    whole = layers.recomputed_by_channels(channelwise, 11, 10, x, y)
    want = torch.autograd.grad((whole * weight).sum(), [x, y])
    blocks = []
    monkeypatch.setattr(layers, "KERNEL_BLOCK_BYTES", 30)  # 3 channels of 10 bytes per block
    counted = lambda x, y, length: blocks.append(x.shape[0]) or channelwise(x, y, length)  # noqa: E731
    split = layers.recomputed_by_channels(counted, 11, 10, x, y)
    got = torch.autograd.grad((split * weight).sum(), [x, y])
    assert blocks[:3] == [3, 3, 2]  # forward; backward recomputes each block once more
    assert blocks[3:] and sorted(blocks[3:]) == [2, 3, 3]
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def step_peak_bytes(family: str, section: dict, seq_len: int) -> int:
    """The most bytes alive during forward + backward of one sequence through a 1-layer model, beyond its
    parameters and gradients, traced on fake tensors."""
    config = model_config(dict(family=family, d_model=64, n_layer=1, vocab_size=32, **section), {})
    with FakeTensorMode():
        model = LanguageModel(config)
        tokens = torch.zeros(1, seq_len + 1, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    from ssmforge.pretrain.plan import _peak_beyond_model

    return _peak_beyond_model(tracker)


@pytest.mark.parametrize("family,section,per_channel", [
    # S4's Cauchy sums: a (channels, L/2 + 1, N) complex128 resolvent, 513 x 64 x 16 bytes per channel
    ("s4", dict(s4=dict(d_state=64)), 513 * 64 * 16),
    # S4D's Vandermonde powers: (channels, N/2, L) complex64
    ("s4d", dict(s4d=dict(d_state=64)), 32 * 1024 * 8),
])
def test_step_peak_is_one_block_of_the_kernel_not_the_layer(family, section, per_channel, monkeypatch):
    """d_model 64, L 1024, N 64. What the kernel adds to the peak, measured against the floor of one-channel
    blocks: with blocks of 8 of the 64 channels it is about an eighth of what the whole layer's kernel adds
    (measured: S4 246 MiB whole, 36 MiB in blocks of 8, floor 17.6 MiB; S4D 65, 9.4 and 5.4 MiB)."""
    peaks = {}
    for channels in (64, 8, 1):
        monkeypatch.setattr(layers, "KERNEL_BLOCK_BYTES", channels * per_channel)
        peaks[channels] = step_peak_bytes(family, section, 1024)
    whole, blocked = peaks[64] - peaks[1], peaks[8] - peaks[1]
    assert whole > 64 * per_channel  # the whole layer's kernel work was alive at the peak
    assert 0 < blocked < 1.25 * whole / 8
