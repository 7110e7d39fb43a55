"""What a layer with weights declares about them (`Weights`, an entry's ``weights``), so that the
passes which change weights — batch-norm folding, weight ranges, equalization, bias correction,
the input columns a layer's statistics are kept over — read a layout, never a class name.

    output_axis    the weight's axis of output channels within a group (0: ``[C_out, C_in/g, k...]``,
                   1: a transposed conv's ``[C_in, C_out/g, k...]``)
    norms          the batch norms that fold into the layer when they read its output alone
    output_rank    its output's number of dims when its type fixes it (a shape without a run)
    columns        the im2col geometry of its input (None: each input row is a column)
    function       the ``F.*`` call that computes it on the model's own tensors, with its
                   parameters in order (`fxq.graphs.canonical.layers_from_functions` makes the module)

An entry that lowers its layer itself keeps output channels on axis 0 (weight ranges, bias
correction and equalization take rows as channels); a layer laid out otherwise reaches integers
through its entry's ``rewrite`` (a transposed conv: an ordinary conv on inserted zeros).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fxq.graphs.canonical import as_parameter

# a conv-like call's parameters in order, with defaults (F.conv2d and friends are builtins without
# a signature to inspect)
CONV_PARAMETERS = (("input", ...), ("weight", ...), ("bias", None), ("stride", 1), ("padding", 0),
                   ("dilation", 1), ("groups", 1))
TRANSPOSED_PARAMETERS = (("input", ...), ("weight", ...), ("bias", None), ("stride", 1), ("padding", 0),
                         ("output_padding", 0), ("groups", 1), ("dilation", 1))
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Weights:
    """A weighted layer's layout (the module docstring)."""

    module: type
    output_axis: int = 0
    norms: tuple[type, ...] = ()
    output_rank: int | None = None
    columns: Callable[[nn.Module], dict | None] = lambda layer: None
    function: Callable | None = None
    parameters: tuple = ()

    def output_channels(self, layer: nn.Module) -> int:
        weight, groups = layer.weight, getattr(layer, "groups", 1)
        return weight.shape[0] if self.output_axis == 0 else weight.shape[1] * groups

    def input_channels(self, layer: nn.Module) -> int:
        weight, groups = layer.weight, getattr(layer, "groups", 1)
        return weight.shape[1] * groups if self.output_axis == 0 else weight.shape[0]

    def per_output(self, layer: nn.Module, values: torch.Tensor) -> torch.Tensor:
        """``values`` (one per output channel) shaped to multiply the weight, whatever its layout."""
        weight, groups = layer.weight, getattr(layer, "groups", 1)
        if self.output_axis == 0:
            return values.reshape(-1, *[1] * (weight.dim() - 1))
        # group g's rows [g·C_in/g, (g+1)·C_in/g) feed outputs g·C_out/g + j, j along axis 1
        by_group = values.reshape(groups, 1, weight.shape[1], *[1] * (weight.dim() - 2))
        return by_group.expand(groups, weight.shape[0] // groups, *by_group.shape[2:]).reshape(
            weight.shape[0], weight.shape[1], *by_group.shape[3:])

    @torch.no_grad()
    def folded(self, layer: nn.Module, norm: nn.Module) -> nn.Module:
        """``norm(layer(x))`` as one layer (eval-mode ``norm``): a copy whose weight is scaled by
        ``γ_c / sqrt(var_c + ε)`` per output channel c and whose bias is ``γ'·(b − mean) + β``.
        ``layer`` itself is not changed."""
        gamma = norm.weight if norm.affine else torch.ones_like(norm.running_mean)
        beta = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        factor = gamma / torch.sqrt(norm.running_var + norm.eps)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        folded = copy.deepcopy(layer)
        folded.weight = nn.Parameter(layer.weight * self.per_output(layer, factor), requires_grad=False)
        folded.bias = nn.Parameter((bias - norm.running_mean) * factor + beta, requires_grad=False)
        return folded.eval()

    def from_call(self, weight: torch.Tensor, bias: torch.Tensor | None, arguments: dict) -> nn.Module | None:
        """The module ``function`` computes with these tensors and arguments (its own parameters
        are those very tensors, not copies); None if the weight does not fit the module."""
        rank = 2 if self.module is nn.Linear else kernel_rank(self.module) + 2
        if weight.dim() != rank:
            return None
        geometry = {k: v for k, v in arguments.items() if k not in ("input", "weight", "bias")}
        groups = geometry.get("groups", 1)
        if self.module is nn.Linear:
            layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            c_in, c_out = ((weight.shape[1] * groups, weight.shape[0]) if self.output_axis == 0
                           else (weight.shape[0], weight.shape[1] * groups))
            layer = nn.utils.skip_init(self.module, c_in, c_out, tuple(weight.shape[2:]), bias=bias is not None,
                                       **geometry)
        return holding(layer, weight, bias)


def kernel_rank(kind: type) -> int:
    return int(kind.__name__[-2])  # Conv2d, ConvTranspose1d: the digit before "d"


def holding(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """``layer`` with the model's own tensors as its parameters (shared, not copied)."""
    layer.weight = as_parameter(weight)
    if bias is not None:
        layer.bias = as_parameter(bias)
    return layer.eval()
