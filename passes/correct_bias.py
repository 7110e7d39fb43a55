"""correct_bias: fold the expected output error of weight rounding back into each layer's bias
(Nagel et al. 2019, "Data-Free Quantization", §4.2, with the input mean measured on the
calibration data instead of derived from batch-norm statistics)."""
from __future__ import annotations

import torch
from torch import fx, nn

from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import finish, module_name
from fxq.integers.observers import InputGram
from fxq.integers.weight_ranges import quantize_sites


def correct_bias(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Quantize each layer's weights now, and shift its bias by the mean error they cause.

    With ``ΔW = W_q·s_W − W`` and ``E[x]`` the mean input column on the calibration data,
    weight rounding moves the layer's output by ``E[ΔW·x] = ΔW·E[x]`` on average: a per-channel
    offset that a ReLU and every later layer turn into a systematic error. Before → after:
    ``conv(x)`` with bias ``b`` → the same conv with bias ``b − ΔW·E[x]``, and its
    ``records.QuantizedWeight`` on its node (the bias does not change how weights
    round, so convert uses these). Runs on each layer whose config has ``bias_correction``; needs
    the ``input_grams`` statistics of calibration (run after `passes.calibrate`).
    """
    modules = dict(gm.named_modules())
    sites, means, grams = {}, {}, {}
    for node in gm.graph.nodes:
        stats = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(stats, InputGram):
            continue
        for user in node.users:
            config = ctx.config_for(module_name(user))
            if config is not None and config.bias_correction:
                sites[user] = (modules[user.target].weight, config)
                means[user], grams[user] = stats.mean, stats.gram_matrix
    learned = {user: records.get(user, records.QuantizedWeight) for user in sites}  # `passes.reconstruct`
    chosen = quantize_sites({u: site for u, site in sites.items() if learned[u] is None}, grams, ctx.chosen_weights)
    chosen.update({u: weights for u, weights in learned.items() if weights is not None})
    for user, weights in chosen.items():
        _shift_bias(modules[user.target], weights, means[user])
        records.put(user, weights)
    return finish(gm)


def _shift_bias(layer: nn.Module, weights, mean: torch.Tensor) -> None:
    weight_q, scales = weights
    w = layer.weight.detach().to(torch.float64).reshape(layer.weight.shape[0], -1)
    error = weight_q.to(torch.float64).reshape(w.shape) * scales[:, None] - w
    if mean.dim() == 2:  # a grouped conv: each channel's mean input is its group's
        mean = mean.repeat_interleave(w.shape[0] // mean.shape[0], 0)
        shift = (error * mean).sum(1)
    else:
        shift = error @ mean
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if layer.bias is None else layer.bias.detach().double()
    layer.bias = nn.Parameter((bias - shift).to(layer.weight.dtype), requires_grad=False)
