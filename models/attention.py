"""Causal self-attention mixer: rotary position embeddings (Su et al. 2021), grouped-query heads
(Ainslie et al. 2023) and an optional sliding window, on torch's scaled_dot_product_attention.
Parameter names (q_proj, k_proj, v_proj, o_proj) follow Hugging Face's Llama attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmforge.kernels.documents import document_starts

from .config import ModelConfig
from .context_parallel import ContextParallel
from .layers import Projection
from .registry import register_mixer


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (L,) or (batch, L) -> cos, sin (L, head_dim // 2) or (batch, 1, L, head_dim // 2) in fp32:
    channel pair i turns by position * theta^(-2i / head_dim). Computed on the fly (no buffer a bf16 cast
    could round)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    if angles.dim() == 3:
        angles = angles[:, None]  # one rotation per row, shared by the heads
    return angles.cos(), angles.sin()


def document_positions(first, L: int, seq_idx: torch.Tensor | None, device) -> torch.Tensor:
    """Rotary positions of L tokens whose first sits at position `first` of its document (an int, or a (batch,)
    tensor, one per row): (L,) or (batch, L) first..first+L-1; with seq_idx (batch, L) each document that
    starts inside the L tokens counts from 0 (a packed document is positioned as if alone)."""
    t = torch.arange(L, device=device)
    base = first + t if isinstance(first, int) else first[:, None] + t
    if seq_idx is None:
        return base
    starts = document_starts(seq_idx)
    last_start = torch.cummax(torch.where(starts, t, 0), dim=1).values
    return torch.where(starts.cummax(dim=1).values, t - last_start, base)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, L, head_dim) rotated pairwise: channel i pairs with i + head_dim/2 (the
    "rotate half" layout of GPT-NeoX and Llama). Computed in fp32, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass
class KVCache:
    """Decoding cache of one attention layer: rotated keys and values of past tokens. With a sliding
    window it is a ring buffer of at most `window` slots (token p in slot p % window), so memory stays
    O(window); without one it grows by doubling, token p in slot p - offset. `document_start` (batch,) is the
    stream index where each row's current document began, once a document has begun after the first token
    (None: every row at 0): earlier keys are masked, positions count from it, and without a window the keys
    that precede every row's document are dropped (offset), so a packed stream keeps only its current
    documents."""

    k: torch.Tensor  # (batch, kv_heads, capacity, head_dim)
    v: torch.Tensor  # (batch, kv_heads, capacity, head_dim)
    window: int | None = None  # the layer's sliding window (a ring buffer) or None (grows)
    length: int = 0  # tokens seen so far: the position of the next token
    document_start: torch.Tensor | None = None
    offset: int = 0  # without a window: the stream index of slot 0

    def restart(self, rows: torch.Tensor) -> None:
        """The next token of the rows (batch,) starts a new document: it sees none of the cached keys. Without
        a window, the keys before every row's current document are dropped."""
        begun = self.document_start if self.document_start is not None else \
            torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        self.document_start = torch.where(rows, self.length, begun)
        if self.window is None:
            unused = int(self.document_start.min()) - self.offset  # one sync per start
            self.k, self.v, self.offset = self.k[:, :, unused:], self.v[:, :, unused:], self.offset + unused

    def in_document(self, index: torch.Tensor) -> torch.Tensor | None:
        """(batch, 1, 1, n) bool, an attention mask over heads and queries: the stream positions `index` (n,)
        that lie in each row's current document (None when every row's document began at 0)."""
        if self.document_start is None:
            return None
        return (index[None, :] >= self.document_start[:, None])[:, None, None]


@register_mixer("attention")
class CausalSelfAttention(nn.Module):
    """The attention mixer; its shapes come from `config.attention` (models.config.AttentionConfig)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        cfg = config.attention
        self.layer_idx = layer_idx
        self.n_heads = cfg.heads
        self.n_kv_heads = cfg.resolved_kv_heads()
        self.head_dim = config.d_model // cfg.heads
        self.window = cfg.window
        self.rope_theta = cfg.rope_theta
        d, hd = config.d_model, self.head_dim
        self.q_proj = Projection(d, self.n_heads * hd, config)
        self.k_proj = Projection(d, self.n_kv_heads * hd, config)
        self.v_proj = Projection(d, self.n_kv_heads * hd, config)
        self.o_proj = Projection(self.n_heads * hd, d, config, residual=True)

    def external_parameters(self) -> list[nn.Parameter]:
        return []  # every weight is used through its own module's forward

    def mean_context(self, seq_len: int) -> float:
        """Keys a query attends to, averaged over the positions of a causal sequence of seq_len."""
        w = self.window if self.window is not None else seq_len
        if seq_len <= w:
            return (seq_len + 1) / 2
        return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token: the four projections plus QK^T and (attention @ V) over the mean
        causal context (softmax and rotary are negligible and not counted)."""
        d = self.q_proj.in_features
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        projections = 2 * d * (2 * q_width + 2 * kv_width)
        return int(projections + 4 * q_width * self.mean_context(seq_len))

    def _heads(self, hidden: torch.Tensor, positions: torch.Tensor):
        """hidden (batch, L, d_model) -> rotated q (batch, heads, L, hd), rotated k and v (batch, kv_heads, L, hd)."""
        b, L, _ = hidden.shape
        q = self.q_proj(hidden).view(b, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _attend(self, q, k, v, mask=None, is_causal=False) -> torch.Tensor:
        """SDPA with kv heads shared by groups of query heads -> (batch, L, heads * hd) for o_proj."""
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2).flatten(2)

    def forward(self, hidden: torch.Tensor, state: KVCache | None = None,
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). seq_idx (batch, L): document index of a packed
        row; a token attends only within its document (block-diagonal causal mask) and its rotary position
        counts from its document's start. With `state`, the tokens follow those cached in it (attending to
        them within the window, only to the keys of each row's current document once a chunk with seq_idx has
        begun one, and with seq_idx, only from the chunk's first document) and are added to it (the last
        `window` of them with a sliding window). With
        `context`, hidden is one chunk of the rows and attends to the keys and values of the chunks up to
        its own, gathered from the group."""
        if context is not None:
            return self._forward_context_parallel(hidden, context)
        batch, L, _ = hidden.shape
        start = 0 if state is None else state.length
        first = start if state is None or state.document_start is None else start - state.document_start
        q, k, v = self._heads(hidden, document_positions(first, L, seq_idx, hidden.device))
        if state is not None and state.length > 0:
            k_past, v_past, past_index = self._ordered_cache(state)
            k, v = torch.cat([k_past, k.to(k_past.dtype)], dim=2), torch.cat([v_past, v.to(v_past.dtype)], dim=2)
        else:
            past_index = torch.arange(0, device=hidden.device)
        key_index = torch.cat([past_index, start + torch.arange(L, device=hidden.device)])
        in_document = None if state is None else state.in_document(key_index)
        if past_index.numel() == 0 and seq_idx is None and (self.window is None or self.window >= L):
            y = self._attend(q, k, v, is_causal=True)
        else:
            distance = (start + torch.arange(L, device=hidden.device))[:, None] - key_index[None, :]
            mask = distance >= 0
            if self.window is not None:
                mask = mask & (distance < self.window)
            if in_document is not None:  # (batch, 1, L, keys)
                mask = mask & in_document
            if seq_idx is not None:  # block-diagonal; cached keys in the document belong to the chunk's first
                key_documents = torch.cat([seq_idx[:, :1].expand(batch, past_index.numel()), seq_idx], dim=1)
                mask = mask & (seq_idx[:, :, None] == key_documents[:, None, :])[:, None]
            y = self._attend(q, k, v, mask=mask)
        if state is not None:
            if seq_idx is not None:
                self._enter_documents(state, start, seq_idx)
            self._store(state, k, v, key_index)
        return self.o_proj(y)

    @staticmethod
    def _enter_documents(state: KVCache, start: int, seq_idx: torch.Tensor) -> None:
        """After a chunk from stream position `start`: each row's current document is the last one it began."""
        t = torch.arange(seq_idx.shape[1], device=seq_idx.device)
        last = torch.where(document_starts(seq_idx), t, -1).max(dim=1).values
        begun = state.document_start if state.document_start is not None else torch.zeros_like(last)
        state.document_start = torch.where(last >= 0, start + last, begun)

    def _forward_context_parallel(self, hidden: torch.Tensor, context: ContextParallel) -> torch.Tensor:
        """One chunk's queries against the keys and values of every chunk up to this rank's (all-gathered:
        the exchange grows with L), under the causal, window and document masks of the whole row."""
        batch, chunk, _ = hidden.shape
        length = chunk * context.size
        start, end = context.span(length)
        full_seq_idx = context.seq_idx
        positions = document_positions(0, length, full_seq_idx, hidden.device)[..., start:end]
        q, k, v = self._heads(hidden, positions)
        # (size, batch, kv_heads, chunk, hd) -> (batch, kv_heads, end, hd): the chunks before and this one
        k, v = (context.gather(t)[:context.rank + 1].permute(1, 2, 0, 3, 4).flatten(2, 3) for t in (k, v))
        distance = torch.arange(start, end, device=hidden.device)[:, None] - torch.arange(end, device=hidden.device)
        mask = distance >= 0
        if self.window is not None:
            mask = mask & (distance < self.window)
        if full_seq_idx is not None:
            mask = (mask & (full_seq_idx[:, start:end, None] == full_seq_idx[:, None, :end]))[:, None]
        return self.o_proj(self._attend(q, k, v, mask=mask))

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        empty = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(k=empty, v=empty.clone(), window=self.window)

    def _ordered_cache(self, state: KVCache):
        """The cached keys and values in stream order, with their stream indices (the last min(length - offset,
        capacity) tokens; slot p % window holds token p in a sliding window's ring buffer)."""
        filled = min(state.length - state.offset, state.k.shape[2])
        index = torch.arange(state.length - filled, state.length, device=state.k.device)
        slots = index - state.offset if self.window is None else index % self.window
        return state.k[:, :, slots], state.v[:, :, slots], index

    def _store(self, state: KVCache, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> None:
        """Refill the cache from keys and values (batch, kv_heads, n, hd) of the stream positions `index` (n,
        consecutive): keep the last `window` of them, or without a window those from the earliest current
        document on (all of them without seq_idx)."""
        keep = index.numel() if self.window is None else min(index.numel(), self.window)
        if self.window is None and state.document_start is not None and index.numel():
            keep = min(keep, int(index[-1]) + 1 - int(state.document_start.min()))
        slots = index[index.numel() - keep:]
        if self.window is None:
            state.offset = int(slots[0]) if keep else state.offset
            slots = slots - state.offset
        else:
            slots = slots % self.window
        state.k = k.new_zeros(*k.shape[:2], keep, k.shape[3], dtype=state.k.dtype)
        state.v = torch.zeros_like(state.k)
        state.k[:, :, slots] = k[:, :, k.shape[2] - keep:].to(state.k.dtype)
        state.v[:, :, slots] = v[:, :, v.shape[2] - keep:].to(state.v.dtype)
        state.length = int(index[-1]) + 1 if index.numel() else state.length

    def _grow(self, state: KVCache, needed: int) -> None:
        """Make room for `needed` slots: double the capacity, capped at the window."""
        capacity = state.k.shape[2]
        if capacity >= needed:
            return
        new = max(needed, 2 * capacity, 16)
        if self.window is not None:
            new = min(new, self.window)
        pad = (0, 0, 0, new - capacity)
        state.k, state.v = F.pad(state.k, pad), F.pad(state.v, pad)

    def step(self, hidden: torch.Tensor, state: KVCache) -> torch.Tensor:
        """One token: hidden (batch, d_model) -> (batch, d_model); appends its key and value to `state`
        and attends over the cache (at most `window` tokens, itself included), continuing each row's current
        document (only its keys, positions from its start) once chunks with seq_idx have begun one."""
        pos = state.length
        positions = torch.tensor([pos], device=hidden.device) if state.document_start is None else \
            (pos - state.document_start)[:, None]
        q, k, v = self._heads(hidden[:, None], positions)
        slot = pos - state.offset if self.window is None else pos % self.window
        self._grow(state, slot + 1)
        if torch.is_grad_enabled():  # a new cache: the one it replaces may be saved for backward by earlier steps
            at = torch.tensor([slot], device=k.device)
            state.k = state.k.index_copy(2, at, k.to(state.k.dtype))
            state.v = state.v.index_copy(2, at, v.to(state.v.dtype))
        else:  # decoding (LanguageModel.step): in place, no copy of the cache per token
            state.k[:, :, slot] = k[:, :, 0].to(state.k.dtype)
            state.v[:, :, slot] = v[:, :, 0].to(state.v.dtype)
        state.length = pos + 1
        # filled slots are the first min(pos + 1 - offset, capacity); keys carry their own rotation, so the
        # ring buffer's order does not matter to softmax
        filled = min(pos + 1 - state.offset, state.k.shape[2])
        mask = None
        if state.document_start is not None:  # plain decoding builds no mask
            slots = torch.arange(filled, device=hidden.device)
            mask = state.in_document(slots + state.offset if self.window is None
                                     else pos - (pos - slots) % self.window)  # the token each slot holds
        y = self._attend(q, state.k[:, :, :filled], state.v[:, :, :filled], mask=mask)
        return self.o_proj(y[:, 0])
