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

    def soft(self, beta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight at h(V), and AdaRound's penalty Σ 1 − |2h − 1|^β (zero only when every h is 0
        or 1; 0 without ``beta``), differentiable in V."""
        return _Soft.apply(self.v, self.floor, self.scales, self.qmax, beta)

    def weight(self) -> torch.Tensor:
        """The weight each V rounds to: ⌈w/s⌉ where V ≥ 0, else ⌊w/s⌋."""
        return self.scales * (self.floor + (self.v >= 0).float()).clamp(-self.qmax, self.qmax)

    def integers(self) -> torch.Tensor:
        return (self.floor + (self.v >= 0).float()).clamp(-self.qmax, self.qmax).to(torch.int8)

    def set_integers(self, q: torch.Tensor) -> None:
        """Start from these integers (each ⌊w/s⌋ or ⌈w/s⌉ of the float weight), half way to flipping."""
        with torch.no_grad():
            self.v.copy_(torch.where(q.float() > self.floor, 1.0, -1.0))


class _Soft(torch.autograd.Function):
    """``LearnedRounding.soft`` in one pass over the weights forward and one backward: the large
    layers of a ResNet spent most of a learning step on the few dozen elementwise ops autograd
    makes of it."""

    @staticmethod
    def forward(ctx, v, floor, scales, qmax, beta):
        sigmoid = torch.sigmoid(v)
        h = sigmoid * (ZETA - GAMMA) + GAMMA
        slope = sigmoid.mul_(1 - sigmoid).mul_(ZETA - GAMMA)  # dh/dV where h is not clamped
        slope *= (h > 0) & (h < 1)
        h.clamp_(0, 1)
        penalty, penalty_slope = v.new_zeros(()), None
        if beta is not None:
            centred = 2 * h - 1
            magnitude = centred.abs()
            power = magnitude.pow(beta - 1)  # the one transcendental pass: |2h − 1|^β = power · magnitude
            penalty = h.numel() - torch.dot(power.flatten(), magnitude.flatten())
            penalty_slope = power.mul_(centred.sign_()).mul_(-2 * beta)  # d/dh of 1 − |2h − 1|^β
        q = h.add_(floor)
        ctx.save_for_backward(slope, ((q >= -qmax) & (q <= qmax)) * scales, penalty_slope)
        return q.clamp_(-qmax, qmax).mul_(scales), penalty

    @staticmethod
    def backward(ctx, weight_grad, penalty_grad):
        slope, weight_slope, penalty_slope = ctx.saved_tensors
        grad = weight_grad * weight_slope
        if penalty_slope is not None:
            grad.add_(penalty_slope, alpha=float(penalty_grad))
        return grad.mul_(slope), None, None, None, None


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
