"""Document boundaries inside packed rows, as every kernel takes them.

A packed training row joins several documents. `seq_idx` (batch, L), integers non-decreasing along each row
(mamba_ssm's name and convention), numbers the document each position belongs to; where it changes, a new
document starts and every sequence mixer must forget what came before: the SSM state restarts from zero
and a convolution tap never reaches across the boundary. seq_idx=None means one document per row.
"""
from __future__ import annotations

import torch


def check_seq_idx(seq_idx: torch.Tensor | None, batch: int, L: int) -> torch.Tensor | None:
    """seq_idx as int32 (batch, L), or ValueError naming what is wrong with it. Monotonicity is not checked
    here (a device sync per call); `document_index` builds it right and the oracles define what any
    integers mean: a reset wherever two neighbours differ."""
    if seq_idx is None:
        return None
    if seq_idx.shape != (batch, L) or seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must be an integer tensor of shape (batch, L) = ({batch}, {L}); got "
                         f"{seq_idx.dtype} {tuple(seq_idx.shape)}")
    return seq_idx.to(torch.int32)


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(batch, L) bool, True where a new document starts after position 0 (the state before it is dropped)."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def same_document(seq_idx: torch.Tensor, lag: int) -> torch.Tensor:
    """(batch, L) bool: position t - lag exists and belongs to t's document (lag >= 0)."""
    same = torch.zeros_like(seq_idx, dtype=torch.bool)
    if lag < seq_idx.shape[1]:
        same[:, lag:] = seq_idx[:, lag:] == seq_idx[:, : seq_idx.shape[1] - lag]
    return same


def document_index(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """seq_idx (batch, L) int32 of packed input rows whose documents are joined by EOS: each EOS starts a new
    document. So every document is read as [EOS, its tokens] (what evaluation feeds a lone document) and
    predicting the EOS that ends one still sees that document (the EOS is a target there, not an input)."""
    return torch.cumsum(input_ids == eos_id, dim=1, dtype=torch.int32)
