"""reconstruct: learn how each weight rounds and where each layer's output range ends, one layer
at a time, against the float model's outputs on the calibration data (AdaRound, Nagel et al. 2020;
LSQ's learned steps, Esser et al. 2020; QDrop's randomly dropped input quantization, Wei et al. 2022)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxq.analysis import progress
from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import finish, module_name, replace_module
from fxq.integers import patches
from fxq.integers.learned import LearnedRange, LearnedRounding
from fxq.integers.observers import InputGram, Observer
from fxq.integers.weight_ranges import quantize_sites

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
ROUNDING_PENALTY = 0.01  # AdaRound's λ, against the reconstruction error summed over channels
WARMUP = 0.2  # the share of iterations before the penalty starts pushing h(V) to 0 or 1
BETA = (20.0, 2.0)  # the penalty's exponent, annealed: flat at first, then sharp
DROP = 0.5  # QDrop: each input value is the float one with this probability while learning
DROP_PATTERNS = 4096  # rows of which values are dropped, drawn once: a step picks among them
# At most this many passes over a layer's rows: 512 samples take 19 at the default 300 steps;
# a small calibration set (64 samples: 150 passes) would only be revisited, at 8× the time
PASSES = 20
STEP_POSITIONS = 64  # rows a step takes per image: more lowered W3A3 MobileNetV2 loss 8.9 → 4.4 points (16)


@dataclass(frozen=True)
class Reconstruction:
    """What `passes.reconstruct` changed in one layer, on the calibration data (`fxq.explain`)."""

    flipped: int       # weights now rounded away from nearest
    weights: int
    error_before: float  # mean squared output error with the weight rule's integers and range
    error_after: float


def reconstruct(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Choose the integers of each conv/linear whose config has ``reconstruct`` (and its output
    range) by minimizing, on the calibration images, the distance between the layer's quantized
    output — from the inputs the layers before it, already quantized, give it — and the float
    model's output there, after the activation that follows. Each layer learns on a sample of
    its output positions (`fxq.integers.patches`): a conv is a matrix product per position, and
    neighbouring positions of one image add little the sample lacks.

    Before: observed float graph, weights rounded later by the weight rule. After: the same graph,
    each such layer carrying a ``records.QuantizedWeight`` (every integer ⌊w/s⌋ or ⌈w/s⌉ at the
    rule's scales) and a ``Reconstruction`` record, and its output observer a learned step
    (``Observer.chosen``). Where learning does not lower the error, the rule's choice stays.
    """
    modules = dict(gm.named_modules())
    layers = [n for n in gm.graph.nodes if _learnable(n, modules, ctx)]
    if not layers:
        return gm
    images = _images(gm)[:max(ctx.config_for(module_name(n)).reconstruct_samples for n in layers)]
    quantized, floating = _simulation(gm, quantize=True), _simulation(gm, quantize=False)
    start = _rule_weights(gm, ctx, modules)
    for node, weights in start.items():  # later layers' inputs come from quantized ones
        shape = (-1,) + (1,) * (weights.weight.dim() - 1)
        _set_weight(quantized, node, weights.weight.float() * weights.scales.float().reshape(shape))
    walks = _Walk(quantized, images), _Walk(floating, images)
    for node in progress.items(layers, "reconstructing", unit="layer"):
        x_q, x_f = (walk.until(node.name) for walk in walks)
        _learn_layer(gm, node, quantized, floating, x_q, x_f, start[node], ctx.config_for(module_name(node)))
    return finish(gm)


def _learnable(node: fx.Node, modules: dict, ctx: PassContext) -> bool:
    if node.op != "call_module" or not isinstance(modules.get(node.target), LAYERS):
        return False
    config = ctx.config_for(module_name(node))
    calls = sum(1 for n in node.graph.nodes if n.op == "call_module" and n.target == node.target)
    return config is not None and config.reconstruct and calls == 1


def _images(gm: fx.GraphModule) -> torch.Tensor:
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    calibration = records.get(placeholder, records.Calibration)
    if calibration is None or calibration.learning is None:
        raise ValueError("reconstruct learns on the samples calibration keeps: run it after passes.calibrate "
                         "(fxq.PASSES' order)")
    return calibration.learning


def _simulation(gm: fx.GraphModule, quantize: bool) -> fx.GraphModule:
    """A float copy of the observed graph: each observer a `LearnedRange` at its range (or an
    identity), input statistics identities."""
    sim = copy.deepcopy(gm)
    for node in sim.graph.nodes:
        module = sim.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, InputGram) or (isinstance(module, Observer) and not (quantize and module.observed)):
            replace_module(sim, node.target, nn.Identity())
        elif isinstance(module, Observer):
            replace_module(sim, node.target, LearnedRange(module.qparams()))
    for p in sim.parameters():
        p.requires_grad_(False)
    return sim.eval()


def _rule_weights(gm: fx.GraphModule, ctx: PassContext, modules: dict) -> dict:
    """Every weighted layer's integers by its config's weight rule (the starting point)."""
    sites, grams = {}, {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], LAYERS):
            config = ctx.config_for(module_name(node))
            if config is None:
                continue
            sites[node] = (modules[node.target].weight, config)
            source = node.args[0]
            stats = modules.get(source.target) if source.op == "call_module" else None
            grams[node] = stats.gram_matrix if isinstance(stats, InputGram) else None
    return quantize_sites(sites, grams, ctx.chosen_weights)


def _set_weight(sim: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> None:
    sim.get_submodule(node.target).weight.data = weight.to(sim.get_submodule(node.target).weight.dtype)


class _Walk:
    """``sim`` run node by node on every image at once, each value kept until its last reader ran:
    every layer's input is computed once, after the layers before it took their learned integers."""

    def __init__(self, sim: fx.GraphModule, images: torch.Tensor):
        self.sim, self.values = sim, {}
        self.nodes = list(sim.graph.nodes)
        self.last_use = {}
        for index, node in enumerate(self.nodes):
            for source in node.all_input_nodes:
                self.last_use[source] = index
        self.images, self.position = images, 0

    def until(self, name: str) -> torch.Tensor:
        """Run up to the node named ``name``; its first input."""
        with torch.no_grad():
            while self.nodes[self.position].name != name:
                self._step(self.nodes[self.position])
                self.position += 1
        return self.values[self.nodes[self.position].args[0]]

    def _step(self, node: fx.Node) -> None:
        value = lambda a: fx.node.map_arg(a, self.values.__getitem__)  # noqa: E731
        if node.op == "placeholder":
            result = self.images
        elif node.op == "get_attr":
            result = _attribute(self.sim, node.target)
        elif node.op == "call_module":
            result = self.sim.get_submodule(node.target)(*value(node.args), **value(node.kwargs))
        elif node.op == "call_function":
            result = node.target(*value(node.args), **value(node.kwargs))
        elif node.op == "call_method":
            receiver, *rest = value(node.args)
            result = getattr(receiver, node.target)(*rest, **value(node.kwargs))
        else:
            return
        self.values[node] = result
        index = self.position
        for source in node.all_input_nodes:
            if self.last_use.get(source) == index:
                del self.values[source]


def _attribute(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _tail(node: fx.Node) -> list[fx.Node]:
    """The nodes between the layer and the values the rest of the network reads: its output
    observer and the activation of its unit, in graph order."""
    unit = records.get(node, records.FusedUnit)
    tail, current = [], node
    while len(current.users) == 1:
        (user,) = current.users
        observer = user.op == "call_module" and user.target.startswith("observers.")
        if not (observer or (unit is not None and user is unit.activation)):
            break
        tail.append(user)
        current = user
    return tail


def _run_tail(sim: fx.GraphModule, tail: list[fx.Node], y: torch.Tensor) -> torch.Tensor:
    for node in tail:
        if node.op == "call_module":
            y = sim.get_submodule(node.target)(y)
        elif node.op == "call_function":
            y = node.target(y, *node.args[1:], **node.kwargs)
        else:
            y = getattr(y, node.target)(*node.args[1:], **node.kwargs)
    return y


class _Layer:
    """One layer's learning problem on sampled rows (`fxq.integers.patches`): its quantized and
    float inputs there, the float target after its tail, and what is learned (its rounding, and
    the step of its output observer if it has one)."""

    def __init__(self, node: fx.Node, quantized: fx.GraphModule, floating: fx.GraphModule,
                 x_q: torch.Tensor, x_f: torch.Tensor, config):
        self.node, self.quantized, self.config = node, quantized, config
        self.layer, self.tail = floating.get_submodule(node.target), _tail(node)
        self.generator = torch.Generator().manual_seed(0)
        self.x_q, self.x_f = patches.sampled_rows(self.layer, (x_q, x_f), self.generator)
        self.per_image = self.x_q.shape[0] // x_q.shape[0]
        with torch.no_grad():
            self.target = _run_tail(floating, self.tail, patches.apply(self.layer, self.x_f, self.layer.weight))
        observers = [n for n in self.tail if n.op == "call_module"
                     and isinstance(quantized.get_submodule(n.target), LearnedRange)]
        self.observer = observers[0] if observers else None
        self.output = quantized.get_submodule(self.observer.target) if self.observer else None

    def rounding(self, start) -> LearnedRounding:
        return LearnedRounding(self.layer.weight, start.scales, self.config.layer_weight_bits)

    def error(self, rounding: LearnedRounding) -> float:
        """The mean distance to the float target over every sampled row."""
        with torch.no_grad():
            return float(_distance(self.forward(self.x_q, rounding.weight()), self.target))

    def forward(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _run_tail(self.quantized, self.tail, patches.apply(self.layer, rows, weight))

    def learn(self, rounding: LearnedRounding) -> None:
        """Adam on V (and the output step), AdaRound's annealed penalty after a warm-up; each step
        on ``reconstruct_batch`` images' worth of rows, at most STEP_POSITIONS of each."""
        batch = min(self.config.reconstruct_batch * min(self.per_image, STEP_POSITIONS), self.x_q.shape[0])
        iterations = min(self.config.reconstruct_iterations, PASSES * math.ceil(self.x_q.shape[0] / batch))
        groups = [{"params": [rounding.v], "lr": 1e-2}]
        if self.output is not None:
            groups.append({"params": [self.output.log_scale], "lr": 4e-3})
        learned = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.Adam(groups)
        warm = int(iterations * WARMUP)
        self.dropped = torch.rand((DROP_PATTERNS,) + self.x_q.shape[1:], generator=self.generator) < DROP
        with torch.enable_grad():  # quantize may be called under no_grad
            for p in learned:
                p.requires_grad_(True)
            for step in range(iterations):
                pick = torch.randint(self.x_q.shape[0], (batch,), generator=self.generator)
                dropped = self.dropped[torch.randint(self.dropped.shape[0], (batch,), generator=self.generator)]
                x = torch.where(dropped, self.x_f[pick], self.x_q[pick])
                beta = _beta((step - warm) / max(iterations - warm, 1)) if step >= warm else None
                weight, penalty = rounding.soft(beta)
                loss = _distance(self.forward(x, weight), self.target[pick]) + ROUNDING_PENALTY * penalty
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for p in learned:
            p.requires_grad_(False)


def _beta(progress: float) -> float:
    """The penalty's exponent, cosine-annealed from BETA[0] to BETA[1]."""
    return BETA[1] + 0.5 * (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * progress))


def _learn_layer(gm, node, quantized, floating, x_q, x_f, start, config) -> None:
    problem = _Layer(node, quantized, floating, x_q, x_f, config)
    rounding = problem.rounding(start)
    rounding.set_integers(start.weight)
    before = problem.error(rounding)
    kept_step = None if problem.output is None else problem.output.log_scale.detach().clone()
    rounding = problem.rounding(start)
    problem.learn(rounding)
    after = problem.error(rounding)
    if after >= before:  # learning did not help here: the rule's integers and range stay
        rounding.set_integers(start.weight)
        if problem.output is not None:
            problem.output.log_scale.data.copy_(kept_step)
        after = before
    integers = rounding.integers()
    _set_weight(quantized, node, rounding.weight().detach())
    nearest = torch.round(problem.layer.weight.detach().float() / rounding.scales).clamp(-rounding.qmax, rounding.qmax)
    records.put(node, records.QuantizedWeight(integers, start.scales))
    records.put(node, Reconstruction(int((integers.float() != nearest).sum()), integers.numel(), before, after))
    if problem.observer is not None:
        gm.get_submodule(problem.observer.target).chosen = problem.output.qparams()


def _distance(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over the rest (AdaRound's and BRECQ's)."""
    return (out - target).pow(2).sum(1).mean()
