"""Liquid-S4 mixer, as in Hasani, Lechner, Wang, Chahine, Amini & Rus, "Liquid Structural State-Space Models"
(ICLR 2023): the S4 block (models.s4, whose system, kernel, state and decoding it reuses) with a liquid input
made of the correlations of consecutive inputs. Per channel h, with the S4 system discretised as (Abar, Bbar):

    c^(p)_t = u_t u_{t-1} ... u_{t-p+1}          products of p consecutive inputs of one document, 2 <= p <= P
                                                 (zero where the window reaches before the sequence or a document start)
    sigma   = sum_n Bbar_n                       over all N states (real: conjugate pairs sum to a real number)
    v_t     = sum_{p=2..P} sigma^(p-1) c^(p)_t   (the reference's liquid input matrix at degree p is Bbar sigma^(p-1))
    kb:     y = K * (u + v) + D u                the liquid terms convolved with the whole S4 kernel
    polyb:  y = K * u + K_0 v + D u              only the kernel's first tap K_0 = Re(C Bbar)

then GELU and the GLU output, as S4. P = liquid_degree (paper default 2), liquid_kernel polyb (the reference's
default); the S4 part keeps S4's HiPPO-LegS initialisation and keys (`model.liquid_s4.*`, LiquidS4Config).

Causality. The reference (raminmh/liquid-s4, src/models/sequence/ss/s4.py, liquid_kernel "polyb" / "kb",
liquid_degree, checked for these semantics) builds its correlations from combinations of the LAST positions of
the sequence and flips them in time, so position t sees inputs after t: no language model can do that (its
allcombs=False branch forms the products u_t u_{t-1}, at degree 3 (u_t u_{t-1})(u_{t-1} u_{t-2}), but flips them
in time as well). This module implements the causal form above: products of the p most recent inputs up to t,
each term at its own position t. The reference also uses the diagonal part of the bilinear input matrix only,
dt B / (1 - dt/2 Lambda); here sigma and K_0 come from the full Bbar of S4's discretisation, so decoding,
chunked feeding and the oracle all use one system.

Decoding keeps the last P - 1 inputs (LiquidS4State.inputs) to form c^(p); kb also feeds u + v to the S4 state.
A forward with a state continues those inputs, and under context parallelism the P - 1 inputs before a chunk
come from the previous rank (context.halo); for kb the S4 state machinery (final state, transfer, entering
state) runs on u + v.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssmforge.kernels.documents import same_document

from .config import ModelConfig
from .context_parallel import ContextParallel
from .registry import register_mixer
from .s4 import S4Mixer, S4State


def liquid_input(u: torch.Tensor, sigma: torch.Tensor, degree: int, history: torch.Tensor,
                 ext_seq_idx: torch.Tensor | None):
    """v_t = sum_{p=2..degree} sigma^(p-1) u_t u_{t-1} ... u_{t-p+1}, (batch, H, L), from u (batch, H, L),
    sigma (H,) and the degree - 1 inputs before u, history (batch, H, degree - 1), oldest first (zeros where
    none). ext_seq_idx (batch, degree - 1 + L) or None: the document of each history and input position; a
    product whose window reaches into an earlier document is zero. Returns (v, the history and u joined)."""
    W = degree - 1
    L = u.shape[-1]
    extended = torch.cat([history.to(u.dtype), u], dim=-1)  # (batch, H, W + L)
    v, product = torch.zeros_like(u), u
    for lag in range(1, W + 1):  # the product of degree lag + 1 from that of degree lag
        earlier = extended[..., W - lag:W - lag + L]  # u_{t - lag}
        if ext_seq_idx is not None:
            earlier = earlier * same_document(ext_seq_idx, lag)[:, None, W:].to(u.dtype)
        product = product * earlier
        v = v + sigma[:, None] ** lag * product
    return v, extended


@dataclass
class LiquidS4State(S4State):
    """Decoding cache of one Liquid-S4 layer: S4's state and the last liquid_degree - 1 inputs."""

    inputs: torch.Tensor | None = None  # (batch, H, liquid_degree - 1), oldest first


@register_mixer("liquid_s4")
class LiquidS4Mixer(S4Mixer):
    """The Liquid-S4 block's mixer: S4 (config.liquid_s4's S4 keys) plus the liquid input."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        cfg = config.liquid_s4
        self.liquid_kernel = cfg.liquid_kernel
        self.liquid_degree = cfg.liquid_degree

    def forward_flops_per_token(self, seq_len: int) -> int:
        """S4's, plus per channel and degree p the product with one more input, the scaling by sigma^(p-1) and
        the sum (3), and the liquid term's entry: K_0 v added (2, polyb) or u + v (1, kb). The powers of sigma
        are per channel, not per token, and left out with the kernel."""
        entry = 2 if self.liquid_kernel == "polyb" else 1
        return super().forward_flops_per_token(seq_len) + self.d_model * (3 * (self.liquid_degree - 1) + entry)

    @staticmethod
    def sigma(Bbar: torch.Tensor) -> torch.Tensor:
        """sum_n Bbar_n over all N states (H,): the liquid input's scale."""
        return Bbar.sum(-1).real

    def first_tap(self, Bbar: torch.Tensor) -> torch.Tensor:
        """K_0 = Re(C Bbar) (H,): polyb's weight of the liquid input."""
        return (self.system()[-1] * Bbar).sum(-1).real

    def ssm(self, u: torch.Tensor, seq_idx: torch.Tensor | None = None, state: LiquidS4State | None = None,
            context: ContextParallel | None = None) -> torch.Tensor:
        """The SSM before the GELU: u (batch, H, L) -> (batch, H, L), S4's with the liquid input."""
        Abar, Bbar = self.discrete()
        history, ext_seq_idx = self._history(u, seq_idx, state, context)
        v, extended = liquid_input(u, self.sigma(Bbar), self.liquid_degree, history, ext_seq_idx)
        if state is not None:  # the last inputs of the row's last document, for the next chunk or step
            tail = extended[..., -(self.liquid_degree - 1):]
            if ext_seq_idx is not None:
                tail = tail * (ext_seq_idx[:, -tail.shape[-1]:] == ext_seq_idx[:, -1:])[:, None, :].to(tail.dtype)
            state.inputs = tail.clone()  # not a view keeping the whole chunk alive
        if self.liquid_kernel == "kb":
            y = self.respond(u + v, Abar, Bbar, seq_idx, state, context)
        else:
            y = self.respond(u, Abar, Bbar, seq_idx, state, context) + self.first_tap(Bbar)[:, None] * v
        return y + self.D[:, None] * u

    def _history(self, u, seq_idx, state, context):
        """The liquid_degree - 1 inputs before u (batch, H, W): the previous rank's under context parallelism, a
        continued state's, else zeros; and the documents of history and u (batch, W + L), or None."""
        W = self.liquid_degree - 1
        batch, H, L = u.shape
        if context is not None:
            if L < W:
                raise ValueError(f"a chunk of {L} positions is shorter than the liquid inputs' reach of {W}")
            return context.halo(u[..., L - W:]), context.halo_seq_idx(W, seq_idx)
        continuing = state is not None and not state.fresh
        history = state.inputs if continuing else u.new_zeros(batch, H, W)
        # the history belongs to u's first document (a carried state reaches only that one)
        ext_seq_idx = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(-1, W), seq_idx], dim=1)
        return history, ext_seq_idx

    def allocate_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LiquidS4State:
        s4 = super().allocate_state(batch, device, dtype)
        inputs = torch.zeros(batch, self.d_model, self.liquid_degree - 1, device=device, dtype=self.log_dt.dtype)
        return LiquidS4State(ssm=s4.ssm, inputs=inputs)

    def step_ssm(self, u: torch.Tensor, state: LiquidS4State) -> torch.Tensor:
        """One position: u (batch, H) -> (batch, H), the liquid input from the inputs the state keeps."""
        _, Bbar = self.step_discrete(state)
        v, extended = liquid_input(u[..., None], self.sigma(Bbar), self.liquid_degree, state.inputs, None)
        v = v[..., 0]
        state.inputs = extended[..., 1:]
        if self.liquid_kernel == "kb":
            return self.advance(u + v, state) + self.D * u
        return self.advance(u, state) + self.first_tap(Bbar) * v + self.D * u
