"""``fxq.quantize``: the whole pipeline behind one call."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

from torch import fx, nn

from fxq import records
from fxq.config import QConfig
from fxq.context import PassContext
from passes.calibrate import calibrate
from passes.convert import convert
from passes.correct_bias import correct_bias
from passes.equalize import equalize
from passes.fold_bn import fold_bn
from passes.fuse import fuse
from passes.insert_observers import insert_observers
from passes.quantize_add import quantize_add
from passes.record_stats import record_stats
from passes.rewrite_layers import rewrite_layers
from passes.trace import trace

Pass = Callable[[nn.Module, PassContext], fx.GraphModule]

# The pipeline, in order. A list, so it can be printed, reordered or extended.
PASSES: list[Pass] = [trace, fold_bn, rewrite_layers, equalize, fuse, insert_observers, calibrate,
                      correct_bias, convert, quantize_add, record_stats]


def quantize(model: nn.Module, calib_loader: Iterable, config: QConfig | None = None,
             passes: Sequence[Pass] | None = None,
             overrides: Mapping[str, QConfig | None] | None = None) -> fx.GraphModule:
    """Quantize a trained float ``model`` after training, calibrating on ``calib_loader``.

    Returns a ``GraphModule`` that takes float input, runs every conv, linear, ReLU, residual add
    and pooling on integer tensors, and returns float (dequantized) logits. ``model`` itself is
    not modified. ``passes`` replaces :data:`PASSES` (the first pass receives ``model``).
    ``overrides`` maps module-name globs to a layer's own ``QConfig``, or to ``None`` to keep it
    in float (``{"layer4.*": QConfig(weight_bits=4), "fc": None}``); first match wins.
    A one-shot iterator (a generator) is read once into a list, since bias correction and
    `fxq.explain`'s statistics read the data again; pass a ``DataLoader`` for large sets.
    """
    config = QConfig() if config is None else config
    if not isinstance(config, QConfig):
        raise TypeError(f"config must be an fxq.QConfig, got {type(config).__name__}")
    if calib_loader is None:
        raise ValueError("calib_loader is None: pass a DataLoader or list of calibration batches")
    if iter(calib_loader) is calib_loader:  # a one-shot iterator; several passes read the data
        calib_loader = list(calib_loader)
    ctx = PassContext(config, calib_loader, dict(overrides or {}))
    gm = model
    for step in PASSES if passes is None else passes:
        gm = step(gm, ctx)
    records.put(gm, config)
    return gm
