"""What the fused selective scans (the C kernel and the Triton kernels) share: the inputs of their custom
ops, the group count of B and C, and the per-row fp32 results their backward kernels write, with the
reduction of those to the gradients of the inputs.

seq_idx (batch, L), the document index of `ssmforge.kernels.documents`, is an input of the ops like the others
(int32 contiguous, or None) but has no gradient."""
from __future__ import annotations

from typing import NamedTuple

import torch

SCAN_INPUTS = ("Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
               "Tensor? seq_idx")
SCAN_OPTIONS = "bool delta_softplus, int chunk"


def num_groups(B: torch.Tensor, C: torch.Tensor) -> int:
    """Groups of the grouped (4-D) B/C, 1 if neither is grouped."""
    groups = [X.shape[1] for X in (B, C) if X.dim() == 4]  # a list: symbolic sizes do not hash
    if len(groups) == 2 and groups[0] != groups[1]:
        raise ValueError(f"B and C must have the same number of groups, got {groups}")
    return groups[0] if groups else 1


class ScanGrads(NamedTuple):
    """The backward kernels' outputs, in the order both take them. fp32: du, ddelta, dz (batch, d, L) (dz
    None without z); per-row partials summed over batch afterwards: dA_rows (batch, d, n), dD_rows and
    dbias_rows (batch, d), dB/dC (batch, d, n) when fixed, else (batch, groups, L, n) accumulated (zeroed)."""
    du: torch.Tensor
    ddelta: torch.Tensor
    dz: torch.Tensor | None
    dA_rows: torch.Tensor
    dB: torch.Tensor
    dC: torch.Tensor
    dD_rows: torch.Tensor
    dbias_rows: torch.Tensor

    @classmethod
    def allocate(cls, u, A, B, C, z) -> ScanGrads:
        batch, dim, L = u.shape
        n, groups = A.shape[1], num_groups(B, C)
        f32 = dict(device=u.device, dtype=torch.float32)

        def bc(X):
            return torch.empty(batch, dim, n, **f32) if X.dim() == 2 else torch.zeros(batch, groups, L, n, **f32)

        return cls(torch.empty(batch, dim, L, **f32), torch.empty(batch, dim, L, **f32),
                   None if z is None else torch.empty(batch, dim, L, **f32), torch.empty(batch, dim, n, **f32),
                   bc(B), bc(C), torch.empty(batch, dim, **f32), torch.empty(batch, dim, **f32))

    def input_grads(self, u, delta, A, B, C, D, z, delta_bias, seq_idx) -> tuple:
        """The gradients of the scan's inputs, in their dtypes; None for the optional inputs not given.
        seq_idx, integers, has none: it gets `no_gradient(seq_idx)`."""
        return (
            self.du.to(u.dtype), self.ddelta.to(delta.dtype), self.dA_rows.sum(0).to(A.dtype),
            _grad_bc(self.dB, B), _grad_bc(self.dC, C),
            None if D is None else self.dD_rows.sum(0).to(D.dtype),
            None if z is None else self.dz.to(z.dtype),
            None if delta_bias is None else self.dbias_rows.sum(0).to(delta_bias.dtype),
            no_gradient(seq_idx),
        )


def no_gradient(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """What the backward returns for seq_idx. kernel_op wants a tensor for every input given, and autograd drops
    it (an integer tensor never requires grad): an empty one, which costs nothing."""
    return None if seq_idx is None else seq_idx.new_empty(0)


def _grad_bc(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Back to the layout of B or C: per-row partials (batch, d, n) sum over batch when fixed; (batch,
    groups, L, n) transposes, and sums over the groups when B/C was (batch, n, L), shared by all."""
    if like.dim() == 2:
        return grad.sum(0).to(like.dtype)
    grad = grad.transpose(-1, -2)
    return (grad.sum(1) if like.dim() == 3 else grad).to(like.dtype)
