"""What `passes.reconstruct` learns: how each weight rounds, and where an activation range ends.

    LearnedRounding   w ≈ s·clamp(⌊w/s⌋ + h(V), −qmax, qmax)    AdaRound (Nagel et al. 2020):
                      h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)     h → 0 or 1 under a regularizer,
                                                                then rounds down (V < 0) or up
    LearnedRange      x ≈ s·(clamp(round(x/s) + z, 0, 2^b − 1) − z)   LSQ (Esser et al. 2020): the
                                                                       step s learned, round()'s
                                                                       gradient passed straight

Both keep the scales and zero points fxq's integer ops take: the result is a choice of integers
(each ⌊w/s⌋ or ⌈w/s⌉) and of activation steps, never new float weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fxq.integers.affine import ActQParams, weight_qmax

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly


class LearnedRounding(nn.Module):
    """A layer's weight, rounded up or down per weight as ``V`` says, at fixed per-channel scales."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bits: int):
        super().__init__()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("scales", scales.to(torch.float32).reshape(shape))
        scaled = weight.detach().float() / self.scales
        self.register_buffer("floor", torch.floor(scaled))
        self.qmax = weight_qmax(bits)
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)  # starts where the float weight is
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def up(self) -> torch.Tensor:
        """h(V) ∈ [0, 1]: how far each weight has moved from ⌊w/s⌋ towards ⌈w/s⌉."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def weight(self, hard: bool = False) -> torch.Tensor:
        step = (self.v >= 0).float() if hard else self.up()
        return self.scales * (self.floor + step).clamp(-self.qmax, self.qmax)

    def regularizer(self, beta: float) -> torch.Tensor:
        """Σ 1 − |2h − 1|^β: zero only when every h is 0 or 1."""
        return (1 - (2 * self.up() - 1).abs().pow(beta)).sum()

    def integers(self) -> torch.Tensor:
        return (self.floor + (self.v >= 0).float()).clamp(-self.qmax, self.qmax).to(torch.int8)

    def set_integers(self, q: torch.Tensor) -> None:
        """Start from these integers (each ⌊w/s⌋ or ⌈w/s⌉ of the float weight), half way to flipping."""
        with torch.no_grad():
            self.v.copy_(torch.where(q.float() > self.floor, 1.0, -1.0))


class LearnedRange(nn.Module):
    """Fake quantization with a learned step and the zero point it started with; off: identity."""

    def __init__(self, qparams: ActQParams):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(qparams.scale)))
        self.zero_point, self.bits = qparams.zero_point, qparams.bits
        self.levels = (1 << qparams.bits) - 1
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        # LSQ's gradient scale: the step's gradient sums over every value, so it is damped by
        # √(values · levels) to move at the pace of a single weight's
        damp = 1.0 / math.sqrt(x[0].numel() * self.levels)
        log_scale = self.log_scale * damp + (self.log_scale * (1 - damp)).detach()
        scale = log_scale.exp()
        scaled = x / scale
        q = (scaled + (torch.round(scaled) - scaled).detach() + self.zero_point).clamp(0, self.levels)
        return (q - self.zero_point) * scale

    def qparams(self) -> ActQParams:
        return ActQParams(float(self.log_scale.exp()), self.zero_point, self.bits)
