"""``fxq.quantize``: the whole pipeline behind one call; `Calibrated`: one calibration, several configs."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

from torch import fx, nn

from fxq.config import QConfig
from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import code_made_when_run, compiled, copied, module_name
from fxq.integers.observers import InputGram
from passes.calibrate import calibrate, learning_samples
from passes.convert import convert
from passes.correct_bias import correct_bias
from passes.equalize import equalize
from passes.fold_bn import fold_bn
from passes.fuse import fuse
from passes.insert_observers import insert_observers, set_observer_widths
from passes.quantize_add import quantize_add
from passes.reconstruct import reconstruct
from passes.record_stats import record_stats
from passes.rewrite_layers import rewrite_layers
from passes.trace import trace

Pass = Callable[[nn.Module, PassContext], fx.GraphModule]

# The pipeline, in order. A list, so it can be printed, reordered or extended.
PASSES: list[Pass] = [trace, fold_bn, rewrite_layers, equalize, fuse, insert_observers, calibrate,
                      reconstruct, correct_bias, convert, quantize_add, record_stats]


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
    ctx = _context(calib_loader, config, overrides)
    gm = _run(model, ctx, PASSES if passes is None else passes)
    records.put(gm, ctx.config)
    return gm


class Calibrated:
    """The graph traced and calibrated once, quantized for several configs that calibrate alike.

        shared = Calibrated(model, loader, QConfig(weight_bits=4))
        w4, w6 = shared.quantize(QConfig(weight_bits=4)), shared.quantize(QConfig(weight_bits=6))

    Each result equals ``fxq.quantize(model, loader, config, overrides=overrides)``: the passes
    after `passes.calibrate` run on a copy, with that config. Activation widths may differ (what
    an observer records does not depend on them). Configs whose calibration differs (activation
    range rules, placement, layers kept in float, CLE, or input statistics the calibration config
    did not ask for) are quantized from scratch. `fxq.search_bits` quantizes
    every weight width from one calibration so; calibrate with the config that asks for the most
    statistics (the output-aware rule's Gram matrices). A layer's integers at a given weight width,
    granularity and rule are chosen once and reused by every config served after.
    """

    def __init__(self, model: nn.Module, calib_loader: Iterable, config: QConfig | None = None,
                 overrides: Mapping[str, QConfig | None] | None = None):
        self.model = model
        self.ctx = _context(calib_loader, config, overrides)
        # a pipeline changed so that it has no `calibrate` to stop after: every config from scratch
        self.split = PASSES.index(calibrate) + 1 if calibrate in PASSES else None
        self.graph = _run(model, self.ctx, PASSES[:self.split]) if self.split else None
        self.statistics: dict[str, list[InputGram]] = {}  # layer → the input statistics of its call sites
        for node in self.graph.graph.nodes if self.graph is not None else ():
            stats = self.graph.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(stats, InputGram):
                for user in node.users:
                    self.statistics.setdefault(module_name(user), []).append(stats)
        self.scopes = [""] + [name for name, _ in self.graph.named_modules() if name] if self.graph else []
        self.chosen_weights: dict = {}  # each layer's integers per weight config, for every config served

    def quantize(self, config: QConfig | None = None,
                 overrides: Mapping[str, QConfig | None] | None = None) -> fx.GraphModule:
        """``fxq.quantize(model, loader, config, overrides=overrides)``, from this calibration."""
        ctx = _context(self.ctx.calib_loader, config, overrides)
        ctx.register_layers(self.ctx.layers, self.ctx.modules)
        if self.graph is None or not self._serves(ctx):
            return quantize(self.model, self.ctx.calib_loader, ctx.config, overrides=ctx.overrides)
        shared = [t for sites in self.statistics.values() for m in sites for t in (m.gram, m.column_sum)
                  if t is not None]
        gm = copied(self.graph, shared)
        ctx.chosen_weights = self.chosen_weights
        set_observer_widths(gm, ctx)
        gm = _run(gm, ctx, PASSES[self.split:])
        records.put(gm, ctx.config)
        return gm

    def _serves(self, ctx: PassContext) -> bool:
        """Whether every pass up to calibration would have done the same for ``ctx``."""
        views = lambda c: ([_calibration_view(c.config_for(name)) for name in self.scopes]  # noqa: E731
                           + [_calibration_view(c.input_config()), c.config.cross_layer_equalization])
        return (views(ctx) == views(self.ctx) and learning_samples(ctx) <= learning_samples(self.ctx)
                and all(self._has_statistics(name, ctx.config_for(name)) for name in ctx.layers))

    def _has_statistics(self, layer: str, config: QConfig | None) -> bool:
        """The input statistics ``config`` needs at ``layer`` were recorded."""
        if config is None or not (config.weight_range == "output_aware" or config.bias_correction):
            return True
        recorded = self.statistics.get(layer, [])
        return bool(recorded) and all(m.gram is not None or config.weight_range != "output_aware" for m in recorded)


def _calibration_view(config: QConfig | None) -> tuple | None:
    """What the passes up to calibration read from a layer's config (not its activation width:
    `set_observer_widths` sets that on the copy)."""
    if config is None:
        return None
    return (config.act_range, config.percentile, config.histogram_bins,
            config.averaging_constant, config.placement)


def _context(calib_loader: Iterable, config: QConfig | None,
             overrides: Mapping[str, QConfig | None] | None) -> PassContext:
    config = QConfig() if config is None else config
    if not isinstance(config, QConfig):
        raise TypeError(f"config must be an fxq.QConfig, got {type(config).__name__}")
    if calib_loader is None:
        raise ValueError("calib_loader is None: pass a DataLoader or list of calibration batches")
    if iter(calib_loader) is calib_loader:  # a one-shot iterator; several passes read the data
        calib_loader = list(calib_loader)
    return PassContext(config, calib_loader, dict(overrides or {}))


def _run(gm: nn.Module, ctx: PassContext, passes: Sequence[Pass]) -> fx.GraphModule:
    with code_made_when_run():
        for step in passes:
            gm = step(gm, ctx)
    return compiled(gm)
