"""Contracts every model family keeps, checked the same way for each: causality, and decoding (a prefill
forward that fills a fresh state, then one `step` per token, gives the logits of the parallel forward)."""
import torch

from ssmforge.models import ModelConfig
from ssmforge.models.registry import SYMBOLS

VOCAB = 61  # every_mixer_config's vocabulary
ONE_BYTE_MIB = 2.0**-20  # model.kernel_block_mib of one byte: SSM kernels built one channel at a time


def model_config(base: dict, overrides: dict) -> ModelConfig:
    """ModelConfig from keyword arguments `base` updated by `overrides`, where a mixer section is a dict
    (`attention=dict(window=3)`) that updates the base's section rather than replacing it."""
    kwargs = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            value = {**kwargs[key], **value}
        kwargs[key] = value
    return ModelConfig.from_dict(kwargs)


def every_mixer_config(**kw):
    """A hybrid with one layer of every registered mixer (new mixers join by registering) and an attention
    window long enough to never cut a document here, in fp32."""
    pattern = "".join(sorted(SYMBOLS))
    base = dict(family="hybrid", layer_pattern=pattern, n_layer=len(pattern), d_model=32, vocab_size=VOCAB,
                mamba=dict(d_state=8), mamba2=dict(d_state=16, headdim=8, chunk_size=16), gss=dict(d_state=8),
                attention=dict(heads=4, kv_heads=2), s4=dict(d_state=8), liquid_s4=dict(d_state=8, liquid_kernel="kb"),
                s4d=dict(d_state=8), dss=dict(d_state=8), h3=dict(d_state=8, head_dim=2), hyena=dict(l_max=64),
                lru=dict(d_state=8))
    return model_config(base, kw)


def assert_steps_match_forward(model, ids: torch.Tensor, prefill: int, tol: float = 1e-4) -> None:
    """ids (batch, L): logits of forward(ids[:, :prefill]) with a state, then step() for each later token,
    against forward(ids), to `tol`; the state counts every token."""
    batch, length = ids.shape
    with torch.no_grad():
        full = model(ids)
        state = model.allocate_state(batch)
        outs = [model(ids[:, :prefill], state=state)] if prefill else []
    outs += [model.step(ids[:, t], state)[:, None] for t in range(prefill, length)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=tol, atol=tol)
    assert state.seqlen == length


def assert_chunks_then_steps_match_forward(model, ids: torch.Tensor, cuts=(0, 2, 3, 11, 29, 37),
                                           tol: float = 1e-4):
    """ids (batch, L) fed through one state in chunks of uneven sizes ([cuts[i], cuts[i + 1])), then one `step`
    per remaining token, against one forward over everything; the state counts every token. Returns the state."""
    batch, length = ids.shape
    with torch.no_grad():
        whole = model(ids)
        state = model.allocate_state(batch)
        pieces = [model(ids[:, a:b], state=state) for a, b in zip(cuts, cuts[1:])]
        pieces += [model.step(ids[:, t], state)[:, None] for t in range(cuts[-1], length)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=tol, atol=tol)
    assert state.seqlen == length
    return state


def assert_causal(model, length: int, position: int, vocab: int = 101, seed: int = 4) -> None:
    """Changing the token at `position` leaves every earlier logit unchanged and changes a later one."""
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
    changed = ids.clone()
    changed[0, position] = (ids[0, position] + 1) % vocab
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :position], b[:, :position])
    assert not torch.allclose(a[:, position:], b[:, position:])


def randomize_hf_weights(model):
    """Random, non-default values in every tensor of a transformers Mamba(2) model, so that a wrongly
    mapped tensor cannot go unnoticed; A_log stays in [0, 1) so the decays stay stable."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        for layer in model.backbone.layers:
            layer.mixer.A_log.copy_(torch.rand_like(layer.mixer.A_log))
    return model
