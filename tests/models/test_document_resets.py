"""Packed documents with `seq_idx` (data.document_boundaries=reset): in a stack holding every registered mixer,
the logits and gradients of a packed row equal those of each document run alone; and a sequence fed chunk by
chunk through a carried state equals it fed whole (what long-context evaluation relies on)."""
import pytest
import torch

from ssmforge.kernels.documents import document_index
from ssmforge.models import LanguageModel
from ssmforge.models.registry import SYMBOLS

from .contracts import VOCAB, assert_chunks_then_steps_match_forward, every_mixer_config

EOS = 0


def build(config, seed=0):
    torch.manual_seed(seed)
    return LanguageModel(config).eval()


def documents(lengths, seed):
    """Token lists of the given lengths: every one but the first starts with EOS (how packing joins them, and
    how evaluation prefixes a lone document); no other EOS inside."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i, n in enumerate(lengths):
        body = torch.randint(1, VOCAB, (n,), generator=g)
        if i > 0:
            body[0] = EOS
        docs.append(body)
    return docs


ROWS = [[5, 1, 9, 17], [12, 2, 2, 1, 15]]  # 32 tokens each: length-1 documents, a boundary on a mamba2 chunk edge (16)


def packed_and_alone(model, rows, seed=0):
    """(packed logits per document, alone logits per document) and the summed weighted losses of both, the
    weights random per position so every logit's gradient matters."""
    rows_docs = [documents(lengths, seed + r) for r, lengths in enumerate(rows)]
    ids = torch.stack([torch.cat(docs) for docs in rows_docs])
    seq_idx = document_index(ids, EOS)
    packed = model(ids, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(99)
    weights = torch.randn(packed.shape, generator=g)
    packed_loss = (packed * weights).sum()
    alone_loss, pairs = 0.0, []
    for r, docs in enumerate(rows_docs):
        start = 0
        for doc in docs:
            alone = model(doc[None])
            window = slice(start, start + len(doc))
            alone_loss = alone_loss + (alone[0] * weights[r, window]).sum()
            pairs.append((packed[r, window], alone[0]))
            start += len(doc)
    return pairs, packed_loss, alone_loss


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_documents_run_alone(model, rows=ROWS, seed=0, tol=1e-5):
    """Packed rows of documents (lengths per row) against each document run alone: the logits, and every
    parameter's gradient to tol of the tensor's largest entry (gradients sum over every position)."""
    pairs, packed_loss, alone_loss = packed_and_alone(model, rows, seed)
    for packed, alone in pairs:
        torch.testing.assert_close(packed, alone, rtol=tol, atol=tol)
    g_packed, g_alone = grads(model, packed_loss), grads(model, alone_loss)
    assert g_packed.keys() == g_alone.keys() and len(g_packed) == len(list(model.parameters()))
    for name in g_packed:
        scale = g_alone[name].abs().max().item()
        torch.testing.assert_close(g_packed[name], g_alone[name], rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("backend", ["auto", "ref"])
def test_a_packed_row_equals_each_document_run_alone(backend):
    model = build(every_mixer_config(kernel_backend=backend))
    assert set(model.config.layer_kinds) == set(SYMBOLS.values())
    assert_documents_run_alone(model)


def test_without_seq_idx_the_documents_see_each_other():
    """The negative: the same packed row without seq_idx differs from the documents alone (so the test above
    can fail), from the second document on."""
    model = build(every_mixer_config())
    docs = documents([6, 10], seed=3)
    with torch.no_grad():
        flowing = model(torch.cat(docs)[None])
        alone = model(docs[1][None])
    assert (flowing[0, 6:] - alone[0]).abs().max() > 1e-3


def test_checkpointed_blocks_pass_seq_idx():
    model = build(every_mixer_config())
    model.train()
    model.checkpoint_blocks = True
    pairs, _, _ = packed_and_alone(model, ROWS[:1])
    for packed, alone in pairs:
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_chunk_by_chunk_through_a_state_equals_the_whole_sequence(window):
    """Chunks of uneven sizes (shorter than the conv width and than the window, and longer), then decoding
    steps, against one forward over everything."""
    model = build(every_mixer_config(attention=dict(window=window)))
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    assert_chunks_then_steps_match_forward(model, ids)


def test_gss_with_its_short_conv_keeps_documents_apart_and_continues_chunks():
    """model.gss.d_conv > 0 adds a conv to GSS (the stack above has the paper's GSS, without one)."""
    model = build(every_mixer_config(layer_pattern="GG", n_layer=2, gss=dict(d_conv=4)))
    assert model.layers[0].mixer.conv1d is not None
    assert_documents_run_alone(model)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(6))
    assert_chunks_then_steps_match_forward(model, ids)


def test_a_carried_state_with_seq_idx_reaches_only_the_first_document():
    """For every mixer (the SSMs' states are what context parallelism passes between ranks): a chunk that
    continues a state and holds a document boundary equals the whole row with the same boundary."""
    model = build(every_mixer_config())
    docs = documents([7, 9, 8], seed=8)
    ids = torch.cat(docs)[None]
    seq_idx = document_index(ids, EOS)
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        state = model.allocate_state(1)
        first = model(ids[:, :4], state=state, seq_idx=seq_idx[:, :4])
        rest = model(ids[:, 4:], state=state, seq_idx=seq_idx[:, 4:])
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, rtol=1e-5, atol=1e-5)


STREAM_CUTS = (0, 3, 7, 12, 16, 18, 24)  # row 0's documents start at 7 and 16, row 1's at 5 and 18


def stream_through_a_state(model, ids, seq_idx, steps_from=None):
    """Logits of ids fed through one state as the chunks STREAM_CUTS (up to `steps_from`), then one `step` per
    remaining token."""
    steps_from = ids.shape[1] if steps_from is None else steps_from
    cuts = [c for c in STREAM_CUTS if c < steps_from] + [steps_from]
    state = model.allocate_state(ids.shape[0])
    pieces = [model(ids[:, a:b], state=state, seq_idx=seq_idx[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    return torch.cat(pieces + [model.step(ids[:, t], state)[:, None] for t in range(steps_from, ids.shape[1])], dim=1)


def stream_rows():
    ids = torch.stack([torch.cat(documents(lengths, seed=9 + r)) for r, lengths in enumerate([[7, 9, 8], [5, 13, 6]])])
    seq_idx = document_index(ids, EOS)
    assert seq_idx[0, 7] != seq_idx[0, 6] and seq_idx[1, 7] == seq_idx[1, 6]
    return ids, seq_idx


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_a_stream_cut_into_chunks_anywhere_equals_it_whole(window):
    """A stream's seq_idx cut into chunks: a chunk whose first position starts a document (in one row, not the
    other) starts it from a cleared state (attention: from no visible key), one that continues a document
    continues it; every mixer, attention's cache whole and as a ring buffer shorter than the chunks."""
    model = build(every_mixer_config(gss=dict(d_conv=4), attention=dict(window=window)))
    ids, seq_idx = stream_rows()
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        torch.testing.assert_close(stream_through_a_state(model, ids, seq_idx), whole, rtol=1e-5, atol=1e-5)
        # the negative: each chunk's seq_idx renumbered from 0 says every chunk continues the last document
        renumbered = torch.cat([seq_idx[:, a:b] - seq_idx[:, a:a + 1]
                                for a, b in zip(STREAM_CUTS, STREAM_CUTS[1:])], dim=1)
        leaked = stream_through_a_state(model, ids, renumbered)
    torch.testing.assert_close(leaked[:, :7], whole[:, :7], rtol=1e-5, atol=1e-5)
    assert (leaked[0, 7:12] - whole[0, 7:12]).abs().max() > 1e-3


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
@pytest.mark.parametrize("steps_from, until", [(9, 16), (20, 24)])
def test_decoding_steps_continue_the_document_a_chunk_began(steps_from, until, window):
    """Chunks with seq_idx, then one `step` per token: the steps continue each row's last document (attention
    sees only its keys, its positions count from its start, whole cache or wrapped ring buffer), from inside
    a document (9, up to the next boundary: a step has no seq_idx) and after each row's last boundary (20)."""
    model = build(every_mixer_config(gss=dict(d_conv=4), attention=dict(window=window)))
    ids, seq_idx = stream_rows()
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        streamed = stream_through_a_state(model, ids, seq_idx, steps_from=steps_from)
    torch.testing.assert_close(streamed[:, steps_from:until], whole[:, steps_from:until], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_steps_that_start_documents_equal_the_whole_stream(window):
    """`step(..., starts=...)` where a token begins a document (each EOS): steps across both rows' boundaries,
    then a chunk whose seq_idx continues the documents the steps began, equal the whole stream; so do steps
    alone from a fresh state. Every mixer, attention's cache whole and as a ring buffer."""
    model = build(every_mixer_config(gss=dict(d_conv=4), attention=dict(window=window)))
    ids, seq_idx = stream_rows()
    starts = torch.cat([torch.zeros(2, 1, dtype=torch.bool), seq_idx.diff(dim=1) != 0], dim=1)
    assert starts.sum(1).tolist() == [2, 2] and bool(starts[:, 3:19].any(0).sum() == 4)

    def steps(state, a, b, with_starts=True):
        return [model.step(ids[:, t], state, starts[:, t] if with_starts else None)[:, None] for t in range(a, b)]

    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        state = model.allocate_state(2)
        first = model(ids[:, :3], state=state, seq_idx=seq_idx[:, :3])
        middle = steps(state, 3, 19)  # row 0's documents start at 7 and 16, row 1's at 5 and 18
        assert state.document.tolist() == seq_idx[:, 18].tolist()
        last = model(ids[:, 19:], state=state, seq_idx=seq_idx[:, 19:])
        torch.testing.assert_close(torch.cat([first, *middle, last], dim=1), whole, rtol=1e-5, atol=1e-5)
        fresh = torch.cat(steps(model.allocate_state(2), 0, 24), dim=1)
        torch.testing.assert_close(fresh, whole, rtol=1e-5, atol=1e-5)
        # steps from a fresh state, then a chunk whose first position starts row 0's second document
        state = model.allocate_state(2)
        stepped = steps(state, 0, 7)
        rest = model(ids[:, 7:], state=state, seq_idx=seq_idx[:, 7:])
        torch.testing.assert_close(torch.cat([*stepped, rest], dim=1), whole, rtol=1e-5, atol=1e-5)
        # the negative: steps without starts carry each row's first document into the next
        leaked = torch.cat(steps(model.allocate_state(2), 0, 24, with_starts=False), dim=1)
    torch.testing.assert_close(leaked[:, :5], whole[:, :5], rtol=1e-5, atol=1e-5)
    assert (leaked[1, 5:] - whole[1, 5:]).abs().max() > 1e-3


def test_steps_that_start_documents_keep_only_the_current_documents():
    """Steps that start documents drop what precedes every row's current document, as chunks do: Hyena's
    inputs and attention's cache without a window follow the documents, not the stream, so a stream longer
    than Hyena's filters (l_max 16) steps through, each document's logits those of it alone."""
    model = build(every_mixer_config(hyena=dict(l_max=16)))
    ids, seq_idx = stream_rows()  # 24 tokens; documents of at most 13
    starts = ids == EOS
    with torch.no_grad():
        state = model.allocate_state(2)
        stepped = torch.stack([model.step(ids[:, t], state, starts[:, t]) for t in range(24)], dim=1)
        kinds = model.config.layer_kinds
        hyena, attention = (state.layers[kinds.index(kind)] for kind in ("hyena", "attention"))
        assert hyena.inputs.shape[-1] == 8  # row 0's last document began at 16, row 1's at 18
        assert attention.offset == 16 and attention.document_start.tolist() == [16, 18]
        for row in range(2):
            bounds = torch.nonzero(seq_idx[row].diff()).flatten().add(1).tolist()
            for a, b in zip([0] + bounds, bounds + [24]):
                torch.testing.assert_close(stepped[row:row + 1, a:b], model(ids[row:row + 1, a:b]), rtol=1e-5,
                                           atol=1e-5)
        plain = model.allocate_state(2)  # the negative: without starts the stream outgrows Hyena's filters
        with pytest.raises(ValueError, match=r"a sequence of 17 positions is longer than model.hyena.l_max=16"):
            for t in range(17):
                model.step(ids[:, t], plain)


def test_step_refuses_starts_of_the_wrong_shape_or_type():
    model = build(every_mixer_config())
    state = model.allocate_state(2)
    token = torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^starts must be a bool tensor of shape \(2,\), got torch.int64 \(2,\)$"):
        model.step(token, state, starts=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^starts must be a bool tensor of shape \(2,\), got torch.bool \(3,\)$"):
        model.step(token, state, starts=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^starts must be a bool tensor of shape \(2,\), got list$"):
        model.step(token, state, starts=[True, False])


@pytest.mark.parametrize("window", [None, 6], ids=["full", "window6"])
def test_attention_alone_streams_documents_as_if_each_ran_alone(window):
    """An attention-only model (no SSM mixer to carry a leak it would hide): the streamed logits of each
    document equal that document fed alone from a fresh state."""
    model = build(every_mixer_config(layer_pattern="**", n_layer=2, attention=dict(window=window)))
    ids, seq_idx = stream_rows()
    with torch.no_grad():
        streamed = stream_through_a_state(model, ids, seq_idx, steps_from=20)
        for row in range(2):
            bounds = torch.nonzero(document_index(ids[row:row + 1], EOS)[0].diff()).flatten().add(1).tolist()
            for a, b in zip([0] + bounds, bounds + [ids.shape[1]]):
                alone = model(ids[row:row + 1, a:b])
                torch.testing.assert_close(streamed[row:row + 1, a:b], alone, rtol=1e-5, atol=1e-5)


def test_a_full_cache_keeps_only_the_current_documents():
    """Without a window, a chunk drops the keys before every row's current document: after the stream's
    chunks the cache holds positions 16.. (row 0's last document starts at 16, row 1's at 18), and steps
    after it give what each row's last document, continued by the same tokens, gives alone."""
    model = build(every_mixer_config(layer_pattern="**", n_layer=2))
    ids, seq_idx = stream_rows()
    more = torch.randint(1, VOCAB, (2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        state = model.allocate_state(2)
        for a, b in zip(STREAM_CUTS, STREAM_CUTS[1:]):
            model(ids[:, a:b], state=state, seq_idx=seq_idx[:, a:b])
        assert [(cache.offset, cache.k.shape[2]) for cache in state.layers] == [(16, 8), (16, 8)]
        assert state.layers[0].document_start.tolist() == [16, 18]
        stepped = torch.stack([model.step(more[:, t], state) for t in range(3)], dim=1)
        for row, start in ((0, 16), (1, 18)):
            alone = model(torch.cat([ids[row, start:], more[row]])[None])[:, -3:]
            torch.testing.assert_close(stepped[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_document_index_starts_a_document_at_each_eos():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 1, 2, 3, 4, 5, 6]])
    assert document_index(ids, EOS).tolist() == [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]
