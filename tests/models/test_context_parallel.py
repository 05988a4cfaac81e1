"""Context parallelism by state passing (models.context_parallel): K gloo ranks, each holding 1/K of every row,
give the loss, the logits and every gradient of one process holding the whole rows, to 1e-5 in fp32, for
Mamba, Mamba-2, GSS (with and without its short conv), a hybrid with attention and an MLP, and the Mamba-360
families (S4 bilinear and ZOH, Liquid-S4 polyb and kb, S4D, DSS, H3, Hyena, LRU), with and without document
resets (documents that cross chunk boundaries, one that starts exactly on one, one that spans every chunk)."""
import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssmforge.kernels.documents import document_index
from ssmforge.models import LanguageModel
from ssmforge.models.context_parallel import ContextParallel

from .contracts import model_config

EOS = 0
VOCAB = 53
LENGTH = 64
FAMILIES = {
    "mamba": dict(family="mamba", n_layer=2),
    "mamba2": dict(family="mamba2", n_layer=2),
    "mamba2 2 groups": dict(family="mamba2", n_layer=2, mamba2=dict(ngroups=2)),
    "gss": dict(family="gss", n_layer=2),
    "gss short conv": dict(family="gss", n_layer=2, gss=dict(d_conv=4)),
    "hybrid": dict(family="hybrid", layer_pattern="M*M-", n_layer=4),
    "every mixer": dict(family="hybrid", layer_pattern="M2G*-", n_layer=5, attention=dict(heads=4, kv_heads=2,
                                                                                          window=20)),
    "survey": dict(family="hybrid", layer_pattern="DEHLYSQ", n_layer=7, h3=dict(head_dim=2),
                   liquid_s4=dict(liquid_kernel="kb", liquid_degree=3)),
    "s4 zoh, liquid polyb": dict(family="hybrid", layer_pattern="SQ", n_layer=2, s4=dict(discretization="zoh")),
}


def config(family: str):
    base = dict(d_model=32, vocab_size=VOCAB, mamba=dict(d_state=8), mamba2=dict(d_state=16, headdim=8, chunk_size=16),
                gss=dict(d_state=8), attention=dict(heads=4), s4d=dict(d_state=8, dt_min=0.05, dt_max=0.5),
                dss=dict(d_state=8, dt_min=0.05, dt_max=0.5), h3=dict(d_state=8, dt_min=0.05, dt_max=0.5),
                lru=dict(d_state=8, r_min=0.5, r_max=0.99), hyena=dict(l_max=64),
                s4=dict(d_state=8, dt_min=0.05, dt_max=0.5), liquid_s4=dict(d_state=8, dt_min=0.05, dt_max=0.5))
    return model_config(base, FAMILIES[family])


def rows(resets: bool):
    """(input ids, targets, seq_idx) of 2 rows of LENGTH. Row 0 has documents starting at 5, 16 (a chunk edge
    for K = 4), 17, 32 (a chunk edge for K = 2 and 4), 40; row 1 is one document over every chunk."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(1, VOCAB, (2, LENGTH + 1), generator=g)
    for start in (5, 16, 17, 32, 40):
        tokens[0, start] = EOS
    inputs = tokens[:, :-1]
    return inputs, tokens[:, 1:], document_index(inputs, EOS) if resets else None


def _worker(rank: int, size: int, init_file: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    context = ContextParallel(dist.group.WORLD, rank, size)
    errors = {}
    cases = [(family, resets, False) for family in FAMILIES for resets in (False, True)]
    for family, resets, checkpointed in cases + [("hybrid", True, True)]:
        torch.manual_seed(0)
        model = LanguageModel(config(family))
        model.checkpoint_blocks = checkpointed  # blocks recomputed in backward, their exchange with them
        inputs, targets, seq_idx = rows(resets)
        full = model(inputs, targets=targets, seq_idx=seq_idx)
        reference = torch.autograd.grad(full, list(model.parameters()))
        with torch.no_grad():
            full_logits = model(inputs, seq_idx=seq_idx)
            logits = model(inputs, seq_idx=seq_idx, context=context)
        loss = model(inputs, targets=targets, seq_idx=seq_idx, context=context)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        # the group's loss is the mean of its chunks' means; its gradient the sum over ranks / size
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(grads)
        start, end = context.span(LENGTH)
        reference = torch.cat([g.flatten() for g in reference])
        errors[f"{family} resets={resets}" + (" checkpointed" if checkpointed else "")] = {
            "loss": abs(total.item() / size - full.item()),
            "logits": (logits - full_logits[:, start:end]).abs().max().item(),
            "grad": ((grads / size - reference).abs().max() / reference.abs().max()).item(),
            "grad_scale": reference.abs().max().item(),
        }
    # under bf16 autocast (a GPU's training precision) the chunks' loss stays within bf16's rounding of the whole's
    torch.manual_seed(0)
    model = LanguageModel(config("every mixer"))
    inputs, targets, seq_idx = rows(True)
    with torch.autocast("cpu", torch.bfloat16):
        full = model(inputs, targets=targets, seq_idx=seq_idx)
        loss = model(inputs, targets=targets, seq_idx=seq_idx, context=context)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    errors["bf16"] = abs(total.item() / size - full.item())
    if rank == size - 1:
        with open(out, "w") as f:
            json.dump(errors, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("size", [2, 4])
def test_chunks_on_k_ranks_give_the_loss_logits_and_gradients_of_the_whole_rows(size, tmp_path):
    out = tmp_path / "errors.json"
    mp.spawn(_worker, args=(size, str(tmp_path / "init"), str(out)), nprocs=size, join=True)
    errors = json.loads(out.read_text())
    assert errors.pop("bf16") < 1e-3
    assert len(errors) == 2 * len(FAMILIES) + 1
    for case, error in errors.items():
        assert error["loss"] < 1e-5, (case, error)
        assert error["logits"] < 1e-5, (case, error)
        assert error["grad"] < 1e-5, (case, error)  # relative to the largest gradient


def test_the_state_exchange_is_what_the_chunks_need():
    """Without the exchange (every chunk from a zero state) the same split is wrong by far more than the
    tolerance: the test above would fail for a mixer that ignored the context."""
    torch.manual_seed(0)
    model = LanguageModel(config("mamba"))
    inputs, targets, _ = rows(False)
    with torch.no_grad():
        whole = model(inputs)[:, 32:]
        alone = model(inputs[:, 32:])
    assert (whole - alone).abs().max() > 1e-2


def test_s4_sends_its_final_states_and_a_flag_per_row_not_its_dense_transfer():
    """S4's transfer Abar^L is the same (H, N, N) matrix on every rank: a rank sends its chunk's final state
    (batch, H, N) and a document flag per row, O(batch H N) like the diagonal families, not (batch, H, N, N)."""
    torch.manual_seed(0)
    model = LanguageModel(config("s4 zoh, liquid polyb"))
    model.layers = model.layers[:1]  # the S layer alone
    sent = []
    context = replace(ContextParallel.stand_in(2), comm_bytes=sent)
    inputs, _, seq_idx = rows(True)
    with torch.no_grad():
        model(inputs, seq_idx=seq_idx, context=context)
    batch, H, N, complex64 = inputs.shape[0], 32, 8, 8
    assert sent == [batch * H * N * complex64, batch * complex64]
