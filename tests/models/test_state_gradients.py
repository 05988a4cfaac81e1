"""Gradients through a decoding state: a sequence fed as chunks and single steps through one state, with autograd
recording, gives the outputs and every gradient of the whole forward, for every registered mixer and for the
model. Each step and chunk leaves the state as new tensors (attention's cache too, while gradients are recorded),
so the tensors an earlier step saved for backward are never overwritten."""
import pytest
import torch

from ssmforge.models import LanguageModel
from ssmforge.models.registry import SYMBOLS

from .contracts import VOCAB, every_mixer_config

# chunk [0, 3), steps 3 and 4, chunk [5, 9), steps 9 .. 11: steps after a chunk and a chunk after steps
SCHEDULE = [(0, 3), 3, 4, (5, 9), 9, 10, 11]
LENGTH = 12


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return LanguageModel(every_mixer_config(**kw)).train()


def through_a_state(mixer, hidden):
    """hidden (batch, LENGTH, d) fed through one fresh state by SCHEDULE -> (batch, LENGTH, d)."""
    state = mixer.allocate_state(hidden.shape[0], hidden.device, hidden.dtype)
    pieces = [mixer(hidden[:, item[0]:item[1]], state) if isinstance(item, tuple)
              else mixer.step(hidden[:, item], state)[:, None] for item in SCHEDULE]
    return torch.cat(pieces, dim=1)


def gradients(output, weight, inputs):
    return torch.autograd.grad((output * weight).sum(), inputs)


def assert_all_close(got, want, names):
    for name, a, b in zip(names, got, want):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(scale, 1e-3), msg=name)


CASES = [(symbol, {}) for symbol in sorted(SYMBOLS)] + [("G", dict(gss=dict(d_conv=4)))]  # GSS's optional conv


@pytest.mark.parametrize("symbol, options", CASES, ids=[f"{s}{'-' if o else ''}{'-'.join(o)}" for s, o in CASES])
def test_chunks_and_steps_through_a_state_give_the_whole_forwards_gradients(symbol, options, one_intra_op_thread):
    model = build(**options)
    mixer = next(block.mixer for block, kind in zip(model.layers, model.config.layer_kinds) if kind == SYMBOLS[symbol])
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, LENGTH, model.config.d_model, generator=g, requires_grad=True)
    weight = torch.randn(2, LENGTH, model.config.d_model, generator=g)
    names, params = zip(*mixer.named_parameters())
    inputs = (hidden, *params)
    whole = mixer(hidden)
    want = gradients(whole, weight, inputs)
    fed = through_a_state(mixer, hidden)
    torch.testing.assert_close(fed, whole, rtol=1e-4, atol=1e-4)
    got = gradients(fed, weight, inputs)
    assert_all_close(got, want, ("hidden", *names))
    assert all(grad.abs().max() > 0 for grad in want[:1])


def test_the_models_chunks_through_a_state_give_the_whole_forwards_gradients(one_intra_op_thread):
    """Every mixer in one stack, the ids fed in three chunks through the model's state (what truncated
    backpropagation through time over a long document does)."""
    model = build()
    ids = torch.randint(1, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(4))
    weight = torch.randn(2, LENGTH, model.config.padded_vocab_size, generator=torch.Generator().manual_seed(5))
    names, params = zip(*model.named_parameters())
    whole = model(ids)
    want = gradients(whole, weight, params)
    state = model.allocate_state(2)
    fed = torch.cat([model(ids[:, a:b], state=state) for a, b in [(0, 5), (5, 6), (6, LENGTH)]], dim=1)
    torch.testing.assert_close(fed, whole, rtol=1e-4, atol=1e-4)
    assert_all_close(gradients(fed, weight, params), want, names)
    assert state.seqlen == LENGTH
