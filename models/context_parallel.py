"""Context parallelism by state passing: one sequence split into K contiguous chunks on the K ranks of a
context group, each rank running every layer on its chunk only.

An SSM layer is linear in its initial state. So each rank scans its chunk from a zero state, and the group
exchanges one summary per rank and layer: the state at the chunk's end and the chunk's transfer (how an
entering state is carried to the end: the total decay, zero where a document starts inside the chunk). An
exclusive scan over those summaries gives every rank the true state entering its chunk, and the layer adds
what that state contributes to its outputs. The exchange is O(batch x state) per layer, independent of the
sequence length (S4 and Liquid-S4, whose transfer Abar^L is a dense (H, N, N) matrix the same on every rank,
send only its per-row document flag and compute the matrix themselves); a causal conv takes a halo of its
width - 1 inputs from the previous rank, and attention gathers the keys and values of the group (O(L): the one layer kind whose exchange grows with the length).

Every collective here is an all-gather whose backward all-reduces the gradients of the gathered pieces, so
the state adjoint flows back to the ranks that produced each state. Each rank builds the same graph (it
computes the scan for every position of the group and selects its own), so the backward collectives run
in the same order on every rank. The document index `seq_idx` is that of the whole row: positions keep
their document numbers on every rank, and a chunk whose first token starts a document takes no state.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    """tensor -> the group's tensors, stacked (size, *shape); backward sums every rank's gradient of the
    stack and keeps this rank's slice (gloo has no reduce-scatter; the pieces gathered here are small)."""

    @staticmethod
    def forward(ctx, tensor, group, rank, size):
        ctx.group, ctx.rank = group, rank
        pieces = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(pieces, tensor.contiguous(), group=group)
        return torch.stack(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # reduced in place: never autograd's own buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context group: chunk `rank` of `size` of every row, `group` the process group
    of the ranks holding the other chunks. `seq_idx` (batch, L) is the document index of the whole row (None:
    one document per row); `bind` attaches it per batch. `comm_bytes`, when a list, receives the bytes of every
    piece this rank sends (benchmarks read it). `stand_in` makes one for a process without a group: the shapes
    of a rank's exchange with no communication, for tracing memory (pretrain.plan)."""

    group: object
    rank: int
    size: int
    seq_idx: torch.Tensor | None = None
    comm_bytes: list | None = None
    alone: bool = False

    @classmethod
    def stand_in(cls, size: int) -> "ContextParallel":
        """The last rank of a group of `size` (the one attending to every chunk), every piece it would receive
        replaced by a copy of its own: the right shapes and the computation's memory, not its values."""
        return cls(group=None, rank=size - 1, size=size, alone=True)

    def bind(self, seq_idx: torch.Tensor | None) -> "ContextParallel":
        return replace(self, seq_idx=seq_idx)

    def span(self, length: int) -> tuple[int, int]:
        """[start, end) of this rank's chunk in a row of `length` positions."""
        if length % self.size:
            raise ValueError(f"context parallelism over {self.size} ranks needs a length divisible by {self.size}; "
                             f"got {length}")
        chunk = length // self.size
        return self.rank * chunk, (self.rank + 1) * chunk

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(size, *tensor.shape): every rank's tensor, differentiable (complex tensors travel as real pairs)."""
        if tensor.is_complex():
            return torch.view_as_complex(self.gather(torch.view_as_real(tensor)))
        if self.comm_bytes is not None:
            self.comm_bytes.append(tensor.numel() * tensor.element_size())
        if self.alone:
            return torch.stack([tensor] * self.size)
        return _AllGather.apply(tensor, self.group, self.rank, self.size)

    def _continues(self, chunk: int, batch: int, device) -> torch.Tensor:
        """(size, batch) float: 1 where chunk s's first position continues the document that chunk s - 1
        ends (always 0 for chunk 0)."""
        if self.seq_idx is None:
            flags = torch.ones(self.size, batch, device=device)
        else:
            firsts = self.seq_idx[:, ::chunk]  # (batch, size)
            lasts = self.seq_idx[:, chunk - 1::chunk]
            flags = torch.ones(self.size, batch, device=device)
            flags[1:] = (firsts[:, 1:] == lasts[:, :-1]).T.float()
        flags[0] = 0
        return flags

    def entering_state(self, last: torch.Tensor, transfer: torch.Tensor, chunk: int, carry=None) -> torch.Tensor:
        """The state entering this rank's chunk. last (batch, *state): the chunk's final state from a zero
        start; transfer (batch, *state) or broadcastable: what an entering state is multiplied by on its way
        to the end of the chunk (zero where a document starts inside it), gathered in its own shape (a
        per-head decay travels as one number per head). chunk: positions per rank. carry(transfer, state):
        how a transfer acts on a state, for a non-diagonal one (a matrix per row); default the product."""
        carry = carry or torch.mul
        lasts, transfers = self.gather(last), self.gather(transfer.to(last.dtype))
        continues = self._continues(chunk, last.shape[0], last.device).bool()
        continues = continues.view(*continues.shape, *[1] * (last.dim() - 1))
        entering = [torch.zeros_like(last)]
        for s in range(self.size - 1):  # state at the end of chunk s = its own + what entered it, carried
            carried = lasts[s] + carry(transfers[s], entering[s])
            entering.append(torch.where(continues[s + 1], carried, torch.zeros_like(carried)))
        return torch.stack(entering)[self.rank]

    def halo(self, tail: torch.Tensor) -> torch.Tensor:
        """The previous rank's `tail` (batch, channels, width): the inputs a causal conv of this chunk reaches
        back to (zeros on the first rank)."""
        tails = self.gather(tail)
        return torch.cat([torch.zeros_like(tails[:1]), tails[:-1]])[self.rank]

    def halo_seq_idx(self, width: int, local: torch.Tensor | None) -> torch.Tensor | None:
        """seq_idx of the halo's `width` positions followed by the chunk's (None without documents); the first
        rank's zero halo is given the chunk's first document, as a decoding history would be."""
        if self.seq_idx is None:
            return None
        start = self.span(self.seq_idx.shape[1])[0]
        before = self.seq_idx[:, start - width:start] if start >= width else local[:, :1].expand(-1, width)
        return torch.cat([before.to(local.dtype), local], dim=1)


def split_for_context(tensor: torch.Tensor, context: ContextParallel | None, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of `tensor` along `dim` (the whole tensor without context parallelism)."""
    if context is None or context.size == 1 or tensor is None:
        return tensor
    start, end = context.span(tensor.shape[dim])
    return tensor.narrow(dim, start, end - start)
