"""The chunked head loss against the plain one: F.cross_entropy over full logits, and its gradients."""
import pytest
import torch
import torch.nn.functional as F

from ssmforge.kernels import linear_cross_entropy as lce


def plain(hidden, weight, targets, reduction="mean"):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction=reduction)


def loss_and_grads(fn, hidden, weight, targets, **kwargs):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets, **kwargs)
    (loss * 0.7).backward()  # a non-unit incoming gradient must scale both gradients
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])  # one row per chunk, a ragged last chunk, one chunk
def test_equals_the_plain_loss_and_gradients(monkeypatch, reduction, rows):
    vocab = 300
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", rows * vocab)
    torch.manual_seed(0)
    hidden, weight = torch.randn(50, 24), torch.randn(vocab, 24) * 0.3
    targets = torch.randint(0, vocab, (50,))
    ours = loss_and_grads(lce.linear_cross_entropy, hidden, weight, targets, reduction=reduction)
    ref = loss_and_grads(plain, hidden, weight, targets, reduction=reduction)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_matches_a_bf16_head():
    torch.manual_seed(1)
    hidden, weight = torch.randn(40, 32), torch.randn(260, 32) * 0.2
    targets = torch.randint(0, 260, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(lce.linear_cross_entropy, hidden, weight, targets)
        ref = loss_and_grads(plain, hidden, weight, targets)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-3, atol=1e-3)
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_without_gradients_gives_the_loss_alone():
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (10,))
    with torch.no_grad():
        loss = lce.linear_cross_entropy(hidden, weight, targets, reduction="sum")
    torch.testing.assert_close(loss, plain(hidden, weight, targets, "sum"))


def test_a_model_trains_on_the_same_loss_and_gradients_as_with_full_logits(tiny_config):
    from ssmforge.models import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(tiny_config)
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 17))
    chunked = model(tokens[:, :-1], targets=tokens[:, 1:])
    chunked.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    full.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():  # the tied embedding gets both of its gradients
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
