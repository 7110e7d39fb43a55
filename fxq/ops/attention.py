"""``nn.MultiheadAttention`` (torchvision's ViT, RT-DETR, DETR-style decoders) as the ops it
computes, each with an integer form (`passes.rewrite_layers`):

    q, k, v = Linear_q(query), Linear_k(key), Linear_v(value)          heads split: [N, H, L, E/H]
    out     = Linear_out(merge(softmax((q @ kᵀ) · (E/H)^-½, −1) @ v))

in the batch-first layout (a sequence-first call is transposed in and out). The projections are
int8 layers like any other; the scores, softmax and products run as matmul and softmax entries.
A call that asks for the attention weights, masks keys or uses an attention mask stays whole, in
float, with that reason.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx, nn

from fxq.graphs.graph import add_module_near
from fxq.ops.base import KeepInFloat, Lowering, Op, Output
from fxq.ops.weighted import holding

# MultiheadAttention.forward's parameters after the query, in order, with their defaults
_PARAMETERS = (("key", ...), ("value", ...), ("key_padding_mask", None), ("need_weights", True),
               ("attn_mask", None), ("average_attn_weights", True), ("is_causal", False))


def _arguments(node: fx.Node) -> dict | None:
    values = dict(zip((name for name, _ in _PARAMETERS), node.args[1:]))
    if len(node.args) > len(_PARAMETERS) + 1 or set(node.kwargs) - {name for name, _ in _PARAMETERS}:
        return None
    values.update(node.kwargs)
    bound = {name: values.get(name, default) for name, default in _PARAMETERS}
    return None if any(v is ... for v in bound.values()) else bound


def _plain(node: fx.Node, attention: nn.Module) -> str | None:
    """Why this call cannot be rewritten, or None."""
    bound = _arguments(node)
    if bound is None:
        return "called with arguments it does not take"
    if bound["key_padding_mask"] is not None or bound["attn_mask"] is not None or bound["is_causal"]:
        return "a key padding mask, an attention mask or causal attention"
    if any(user.op != "call_function" or user.target is not operator.getitem or (user.args[1] != 0 and user.users)
           for user in node.users):
        return "its attention weights are read"
    if attention.bias_k is not None or attention.add_zero_attn:
        return "learned key/value biases or an added zero attention"
    return None


def _projections(attention: nn.Module) -> list[nn.Linear]:
    """The query, key and value projections as ``nn.Linear`` layers holding the module's tensors."""
    e = attention.embed_dim
    if attention._qkv_same_embed_dim:
        weights = attention.in_proj_weight.detach().split(e)
    else:
        weights = [getattr(attention, f"{p}_proj_weight").detach() for p in "qkv"]
    biases = attention.in_proj_bias.detach().split(e) if attention.in_proj_bias is not None else [None] * 3
    return [_linear(w, b) for w, b in zip(weights, biases)]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    return holding(layer, weight, bias)


def attention_as_layers(gm: fx.GraphModule, node: fx.Node, shape_of: Callable) -> bool:
    """The call → projections, heads split, matmuls and softmax, heads merged, output projection
    (the module docstring); each ``out[0]`` reads the result."""
    attention, bound = gm.get_submodule(node.target), _arguments(node)
    heads, size = attention.num_heads, attention.head_dim
    leaf = node.target.rpartition(".")[2]
    graph = gm.graph
    layers = [add_module_near(gm, node, f"{leaf}_{name}", layer) for name, layer in
              zip(("q", "k", "v", "out"), [*_projections(attention), _linear(
                  attention.out_proj.weight.detach(), None if attention.out_proj.bias is None
                  else attention.out_proj.bias.detach())])]
    with graph.inserting_before(node):
        def batch_first(x):
            return x if attention.batch_first else graph.call_method("transpose", (x, 0, 1))

        def split(x, path):
            h = graph.call_method("unflatten", (graph.call_module(path, (batch_first(x),)), -1, (heads, size)))
            return graph.call_method("transpose", (h, 1, 2))

        q, k, v = (split(x, path) for x, path in zip((node.args[0], bound["key"], bound["value"]), layers))
        scores = graph.call_function(torch.matmul, (q, graph.call_method("transpose", (k, -2, -1))))
        scores = graph.call_function(operator.mul, (scores, size ** -0.5))
        mixed = graph.call_function(torch.matmul, (graph.call_function(torch.softmax, (scores, -1)), v))
        merged = graph.call_method("flatten", (graph.call_method("transpose", (mixed, 1, 2)), -2))
        out = batch_first(graph.call_module(layers[3], (merged,)))
    for user in list(node.users):  # out[0]; an unread out[1] goes
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)
    return True


def _not_rewritten(lo: Lowering, node: fx.Node) -> None:
    raise KeepInFloat("it was not rewritten as its projections and matrix products")


class SelfAttention(nn.Module):
    """The entry's example: self-attention over an image's positions, ``[N, C, H, W]`` in and out."""

    def __init__(self, channels: int = 4, heads: int = 2):
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return self.attention(tokens, tokens, tokens)[0].transpose(1, 2).reshape(x.shape)


MULTIHEAD_ATTENTION = Op(
    "multihead_attention", "its projections (int8 layers), matrix products and softmax on integers",
    _not_rewritten, Output.OWN, modules=(nn.MultiheadAttention,), accepts=_plain,
    rewrite=attention_as_layers, example=SelfAttention)
OPS = (MULTIHEAD_ATTENTION,)
