"""The causal language model shared by every family: embedding, residual blocks of
(RMSNorm -> mixer), final RMSNorm and a (tied) LM head, plus the decoding state of a mixed stack."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import attention, dss, gss, h3, hyena, liquid_s4, lru, mamba, mamba2, mlp, s4, s4d  # noqa: F401  the mixer modules register themselves
from ssmforge.kernels.documents import check_seq_idx
from ssmforge.kernels.linear_cross_entropy import linear_cross_entropy

from .config import ModelConfig
from .context_parallel import ContextParallel, split_for_context
from .layers import RMSNorm
from .registry import MIXERS, check_complete

check_complete()  # every config section has its module


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), with the residual stream optionally kept in fp32."""

    def __init__(self, config: ModelConfig, layer_idx: int, kind: str):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mixer = MIXERS[kind](config, layer_idx)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.residual_in_fp32 else x

    def forward(self, x: torch.Tensor, state=None, seq_idx: torch.Tensor | None = None,
                context: ContextParallel | None = None) -> torch.Tensor:
        # `context` only when sequences are split, so a mixer without context parallelism keeps its interface
        extra = {} if context is None else {"context": context}
        return self._residual(x) + self.mixer(self.norm(x.to(self.norm.weight.dtype)), state, seq_idx=seq_idx, **extra)

    def step(self, x: torch.Tensor, state) -> torch.Tensor:
        return self._residual(x) + self.mixer.step(self.norm(x.to(self.norm.weight.dtype)), state)


class Embedding(nn.Embedding):
    """Token embedding initialised normal(0, std) in its own constructor (see layers.Projection)."""

    def __init__(self, vocab: int, d_model: int, std: float):
        super().__init__(vocab, d_model)
        nn.init.normal_(self.weight, std=std)
        self.weight._no_weight_decay = True


class LMHead(nn.Linear):
    """The output projection. Given targets it returns their cross-entropy instead of logits, computed chunk
    by chunk (kernels.linear_cross_entropy) so training never holds the (batch, L, vocab) logits; inside
    this module's forward, so ZeRO-3 gathers the weight around it as for any layer."""

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        if targets is None:
            return super().forward(hidden).float()
        return linear_cross_entropy(hidden.flatten(0, -2), self.weight, targets.flatten(), reduction)


class InferenceState:
    """Per-layer decoding caches for a batch, filled by a prefill `forward` and advanced by `step`: an SSM
    state, an attention KV cache, or None for a stateless mixer (MLP)."""

    def __init__(self, model: "LanguageModel", batch: int, device: torch.device, dtype: torch.dtype):
        self.layers = [block.mixer.allocate_state(batch, device, dtype) for block in model.layers]
        self.seqlen = 0
        # (batch,): the index of each row's current document, as document_index numbers a stream from its start:
        # 0 on a fresh state, a chunk's last seq_idx, one more at each step that starts a document
        self.document = torch.zeros(batch, dtype=torch.long, device=device)

    def enter(self, seq_idx: torch.Tensor | None) -> None:
        """Before a chunk: with seq_idx (batch, L), a row whose first position's document differs from the
        current one starts that document from a cleared state (chunks cut at a boundary); without, every row
        continues its current document."""
        if seq_idx is not None:
            self._clear(seq_idx[:, 0] != self.document)
            self.document = seq_idx[:, -1]

    def restart(self, rows: torch.Tensor) -> None:
        """Before a step whose token starts a new document in the rows (batch,) bool: their states are cleared,
        and their document index moves on by one, as document_index counts, so that a later chunk whose seq_idx
        begins with that index continues the document the step began."""
        self._clear(rows)
        self.document = self.document + rows.to(self.document.dtype)

    def _clear(self, rows: torch.Tensor) -> None:
        if bool(rows.any()):
            for layer in self.layers:
                _clear_rows(layer, rows)


def _clear_rows(cache, rows: torch.Tensor) -> None:
    """Start a new document in the rows (batch,) of a mixer's decoding state. A recurrence's state or a conv
    history is zeroed, into new tensors: zeros are exactly a fresh start. A cache that grows with the length
    starts the document itself (`restart`): attention masks its keys from then on (zero keys would still be
    attended to), Hyena zeroes its inputs; both drop what precedes every row's current document."""
    if cache is None:
        return
    if hasattr(cache, "restart"):
        cache.restart(rows)
        return
    for field in dataclasses.fields(cache):
        value = getattr(cache, field.name)
        if torch.is_tensor(value):
            setattr(cache, field.name, value.masked_fill(rows.view(-1, *[1] * (value.dim() - 1)), 0))
        elif dataclasses.is_dataclass(value):
            _clear_rows(value, rows)


class LanguageModel(nn.Module):
    """Causal LM over `config.padded_vocab_size` tokens; logits come back in fp32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = Embedding(config.padded_vocab_size, config.d_model, config.initializer_range)
        self.layers = nn.ModuleList(Block(config, i, kind) for i, kind in enumerate(config.layer_kinds))
        self.norm_f = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = LMHead(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.checkpoint_blocks = False  # recompute each block's activations in backward (saves memory)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(hidden.to(self.norm_f.weight.dtype)))

    def forward(self, input_ids: torch.Tensor, state: InferenceState | None = None,
                targets: torch.Tensor | None = None, reduction: str = "mean",
                seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        """input_ids (batch, L) -> logits (batch, L, padded_vocab) in fp32. With `state`, the tokens continue
        the sequence it holds (none when fresh) and it is left ready for `step` or the next chunk: a long
        sequence can be fed chunk by chunk in memory independent of its length (attention layers keep
        their window). With `targets` (batch, L): their cross-entropy instead (fp32 scalar, the mean or sum
        over tokens), without materialising the logits. seq_idx (batch, L), non-decreasing integers per
        row (kernels.documents.document_index builds it from EOS positions): every mixer treats each
        document of a packed row as if it ran alone (zero state, no conv tap or attention across a boundary).
        With `state` too, the chunk's first document continues the previous chunk's last one if their seq_idx
        values are equal and starts afresh if not, so a stream's seq_idx cut into chunks anywhere gives what
        the whole stream gives.

        With `context` (models.context_parallel), this rank computes its chunk of the rows only: input_ids,
        targets and seq_idx are the whole rows, the logits or the loss (the mean over the chunk's tokens, or
        their sum) are the chunk's, and every layer exchanges with the ranks holding the other chunks."""
        if context is not None and context.size > 1:
            if state is not None:
                raise ValueError("context parallelism is for training and scoring whole rows, not for decoding")
            context = context.bind(check_seq_idx(seq_idx, *input_ids.shape))
            input_ids, targets, seq_idx = (split_for_context(t, context) for t in (input_ids, targets, seq_idx))
        else:
            context = None
        hidden = self.hidden_states(input_ids, state, seq_idx, context)
        if targets is None:
            return self._logits(hidden)
        return self.lm_head(self.norm_f(hidden.to(self.norm_f.weight.dtype)), targets, reduction)

    def features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (batch, L) -> the final normed hidden states (batch, L, d_model) that the LM head
        reads: what task heads (e.g. GLUE classifiers) pool."""
        return self.norm_f(self.hidden_states(input_ids).to(self.norm_f.weight.dtype))

    def hidden_states(self, input_ids: torch.Tensor, state: InferenceState | None = None,
                      seq_idx: torch.Tensor | None = None, context: ContextParallel | None = None) -> torch.Tensor:
        seq_idx = check_seq_idx(seq_idx, *input_ids.shape)
        if state is not None:
            state.enter(seq_idx)
        hidden = self.embedding(input_ids)
        for i, block in enumerate(self.layers):
            if state is None and self.checkpoint_blocks and self.training:
                hidden = checkpoint(block, hidden, None, seq_idx, context, use_reentrant=False)
            else:
                hidden = block(hidden, None if state is None else state.layers[i], seq_idx, context)
        if state is not None:
            state.seqlen += input_ids.shape[1]
        return hidden

    def allocate_state(self, batch: int) -> InferenceState:
        param = self.embedding.weight
        return InferenceState(self, batch, param.device, param.dtype)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, state: InferenceState, starts: torch.Tensor | None = None) -> torch.Tensor:
        """One token per sequence: input_ids (batch,) -> logits (batch, padded_vocab). O(1) in the length
        for SSM layers; an attention layer attends over its KV cache (at most model.attention.window tokens).
        Each row continues its current document, except where starts (batch,) bool is set: there the token
        begins a new one (an EOS in a packed stream: starts = input_ids == EOS, as document_index counts), from a
        cleared state, as a chunk with seq_idx would begin it."""
        if starts is not None:
            if not (torch.is_tensor(starts) and starts.dtype == torch.bool and starts.shape == input_ids.shape):
                got = f"{starts.dtype} {tuple(starts.shape)}" if torch.is_tensor(starts) else type(starts).__name__
                raise ValueError(f"starts must be a bool tensor of shape {tuple(input_ids.shape)}, got {got}")
            state.restart(starts)
        hidden = self.embedding(input_ids)
        for block, layer_state in zip(self.layers, state.layers):
            hidden = block.step(hidden, layer_state)
        state.seqlen += 1
        return self._logits(hidden)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at context `seq_len`: every block's mixer plus the LM head
        (training costs about 3x)."""
        head = 2 * self.config.d_model * self.config.padded_vocab_size
        return head + sum(block.mixer.forward_flops_per_token(seq_len) for block in self.layers)
