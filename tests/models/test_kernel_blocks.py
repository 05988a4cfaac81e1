"""SSM kernels built a block of channels at a time (models.layers.recomputed_by_channels): the same values and
gradients as one call over every channel, and a training step's peak memory bounded by one block's work rather
than the whole layer's, measured by torch's memory tracker (the one `ssmforge plan` uses)."""
import pytest
import torch

from ssmforge.kernels.backends import triton_available
from ssmforge.models import layers
from ssmforge.pretrain.config import load_config
from ssmforge.pretrain.plan import Target, step_memory

from ..pretrain.conftest import ROOT


def channelwise(x: torch.Tensor, y: torch.Tensor, length: int) -> torch.Tensor:
    """A stand-in kernel: channels independent, a (channels, length) result."""
    steps = torch.arange(length, dtype=x.dtype)
    return (x[:, :, None] * torch.cos(y[:, :, None] * steps)).sum(1)


def test_ragged_blocks_equal_one_call_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, 11, generator=g, dtype=torch.float64)
    whole = layers.recomputed_by_channels(channelwise, 11, 10, x, y, block_bytes=80)
    want = torch.autograd.grad((whole * weight).sum(), [x, y])
    blocks = []
    counted = lambda x, y, length: blocks.append(x.shape[0]) or channelwise(x, y, length)  # noqa: E731
    split = layers.recomputed_by_channels(counted, 11, 10, x, y, block_bytes=30)  # 3 channels of 10 bytes
    got = torch.autograd.grad((split * weight).sum(), [x, y])
    assert blocks[:3] == [3, 3, 2]  # forward; backward recomputes each block once more
    assert blocks[3:] and sorted(blocks[3:]) == [2, 3, 3]
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def step_peak_bytes(config_name: str, d_state: int, seq_len: int, *overrides: str, device: str = "cpu",
                    d_model: int = 64) -> int:
    """Activation bytes of one training step of one sequence through a 1-layer, d_model 64 (or `d_model`) version
    of configs/<config_name>-tiny.yaml, as `ssmforge plan` traces it (fake tensors, the kernels of `device`)."""
    family = config_name.replace("-", "_")
    config = load_config(ROOT / "configs" / f"{config_name}-tiny.yaml", [
        "run_dir=unused", f"model.d_model={d_model}", "model.n_layer=1", f"model.{family}.d_state={d_state}",
        f"data.seq_len={seq_len}", *overrides])
    return step_memory(config, Target(1, device, "probe", None, 1e12, ""), 1, False)[0].activations


@pytest.mark.parametrize("config_name,per_channel", [
    # S4's Cauchy sums: a (channels, L/2 + 1, N) complex128 resolvent, 513 x 64 x 16 bytes per channel, and
    # their complex128 sums and spectrum at the 513 nodes (7) and float64 kernel (models.s4.S4Mixer.kernel); C~'s
    # geometric sum, 17 (N, N) complex128 matrices a channel, is a block of its own, half as many channels
    ("s4", 513 * 64 * 16 + 7 * 513 * 16 + 8 * 1024),
    # S4D's Vandermonde powers: (channels, N/2, L) complex64
    ("s4d", 32 * 1024 * 8),
])
def test_step_peak_is_one_block_of_the_kernel_not_the_layer(config_name, per_channel):
    """d_model 64 (S4: 16), L 1024, N 64. What the kernel adds to the peak, measured against the floor of
    one-channel blocks (model.kernel_block_mib set to all, an eighth of and 1 of the channels' work): with blocks
    of an eighth of the channels it is about an eighth of what the whole layer's kernel adds (measured: S4 48.8 MiB
    whole, 6.5 MiB in blocks of 2, floor 3.5 MiB; S4D 65, 9.5 and 6.0 MiB). S4 runs at d_model 16 because its
    trace costs a third of a second per block of channels (42 s for the floor at 64, 10 s at 16); its peaks are a
    quarter of 64's (195, 26, 13.4 MiB) and its ratios the same (blocked / (whole / 8): 0.53 at 16, 0.55 at 64;
    blocks 4 times too large give 2.7). S4D stays at 64: at 16 its block hides under the layer's other
    activations."""
    d_model = 16 if config_name == "s4" else 64
    peaks = {}
    for channels in (d_model, d_model // 8, 1):
        peaks[channels] = step_peak_bytes(config_name, 64, 1024,
                                          f"model.kernel_block_mib={channels * per_channel / 2**20!r}",
                                          d_model=d_model)
    whole, blocked = peaks[d_model] - peaks[1], peaks[d_model // 8] - peaks[1]
    assert whole > d_model * per_channel  # the whole layer's kernel work was alive at the peak
    assert 0 < blocked < 1.25 * whole / 8


def test_h3_builds_its_kernel_once_per_head_not_per_product():
    """H3's head_dim^2 products of a head share its SSM, so the kernel is built for d_model / head_dim channels:
    a wider head_dim lowers the step's peak rather than multiplying it by head_dim^2 (measured at d_model 64,
    L 1024, N 64: 68.7 MiB at head_dim 1, 21.4 MiB at head_dim 4; 261.5 MiB at 4 when built per product)."""
    narrow = step_peak_bytes("h3", 64, 1024, "model.h3.head_dim=1")
    wide = step_peak_bytes("h3", 64, 1024, "model.h3.head_dim=4")
    assert wide < narrow / 2


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("config_name,work", [
    ("s4d", 64 * 32 * 1024 * 8),  # the Vandermonde powers: N/2 = 32 modes, complex64
    ("dss", 64 * 32 * 1024 * 8),  # (DSS keeps twice as many modes: half of them is the bound)
    ("s4", 64 * 513 * 64 * 16),  # the Cauchy sums' resolvent: L/2 + 1 nodes, N 64, complex128
])
def test_the_fused_kernels_keep_no_powers_or_resolvent(config_name, work):
    """On CUDA (traced on fake tensors) the kernel is built by the fused Triton kernels, which never hold the
    (channels, modes, L) powers or S4's resolvent: the step's peak drops by more than half of that work
    (measured at d_model 64, L 1024, N 64: S4D 65.2 against 6.0 MiB, DSS 129.3 against 6.1, S4 246.4 against
    62.6; at d_model 2048, L 2048: S4D 1.08 against 0.32 GiB, S4 1.17 against 0.58)."""
    blocked = step_peak_bytes(config_name, 64, 1024, device="cpu")
    fused = step_peak_bytes(config_name, 64, 1024, device="cuda")
    assert fused < blocked - work / 2


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_the_fused_scans_keep_only_lambda_and_the_states():
    """LRU at d_state 256, L 2048 (d_model 64): PyTorch's doubling scan clones its inputs and builds the adjoint
    scan's flipped copies, (L, N) complex64 each (4 MiB); the fused scans, Triton's on CUDA and the C kernel on
    CPU (traced on fake tensors), read lambda expanded over time in place and keep neither b nor copies
    (measured: 38.8 against 18.8 MiB on both)."""
    one = 2048 * 256 * 8
    doubling = step_peak_bytes("lru", 256, 2048, "model.kernel_backend=ref", device="cpu")
    for device in ("cuda", "cpu"):
        assert step_peak_bytes("lru", 256, 2048, device=device) < doubling - 4 * one, device
