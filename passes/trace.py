"""trace: a user's ``nn.Module`` → a ``GraphModule`` of a deep copy (the user's model is untouched)."""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import linecache
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace

from fxq import ops
from fxq.graphs import canonical, records, shapes, sized
from fxq.graphs.context import PassContext
from fxq.graphs.graph import add_module_near, run_recording
from fxq.ops import assign
from passes.calibrate import batch_input


class _PathTracer(fx.Tracer):
    """A symbolic tracer that remembers which submodule it is inside, for error messages, and
    keeps the submodules ``opaque`` matches as single calls (leaves) instead of tracing into them."""

    def __init__(self, opaque: tuple[str, ...] = ()):
        super().__init__()
        self.path: list[str] = []
        self.failed_in: str | None = None  # the innermost submodule an error came from
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if any(fnmatch.fnmatchcase(qualified_name, pattern) for pattern in self.opaque):
            return True
        # a subclass running a torch layer's own forward is that layer (its forward may not trace)
        base = canonical.torch_class(m)
        if base is not type(m) and not issubclass(base, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return True
        return super().is_leaf_module(m, qualified_name)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """The model's first input is the one traced; every other parameter of its forward keeps
        its default (ViT's ``attn_mask=None``) or, past ``*args``/``**kwargs``, is not given
        (Ultralytics' ``forward(x, *args, **kwargs)``). Required extra inputs trace as inputs, and
        `_check_one_input` refuses them by name."""
        parameters = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[int(is_module):]
        if concrete_args is not None or not parameters or not all(map(_optional, parameters[1:])) \
                or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        x = self.create_proxy("placeholder", parameters[0].name, (), {})
        return root_fn, [self.root, x] if is_module else [x]

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """Each node records the frames of the model's code that made it (`fxq.graphs.graph.source_line`
        reads the innermost). torch.fx's own record (``record_stack_traces``) extracts and formats the
        whole stack with its source text: a fifth of tracing a small model."""
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.stack_trace = node.stack_trace or _forward_frames(sys._getframe(1))
        return node

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.path[-1]
            raise
        finally:
            self.path.pop()


_TRACING = (str(Path(fx.__file__).parent), __file__)  # the tracer's own frames, in every node's stack


def _forward_frames(frame) -> str | None:
    """The live frames from the outermost ``forward`` in to ``frame``, in traceback format (outermost
    first) less the tracer's own; None outside any ``forward`` (the graph's inputs and output), as torch.fx
    records them."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    forwards = [i for i, f in enumerate(frames) if f.f_code.co_name == "forward"]
    if not forwards:
        return None
    return "\n".join(f'  File "{f.f_code.co_filename}", line {f.f_lineno}, in {f.f_code.co_name}\n'
                     f'    {linecache.getline(f.f_code.co_filename, f.f_lineno).strip()}'
                     for f in reversed(frames[:forwards[-1] + 1]) if not f.f_code.co_filename.startswith(_TRACING))


def _optional(parameter: inspect.Parameter) -> bool:
    variadic = parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    return variadic or parameter.default is not parameter.empty


def trace(model: nn.Module, ctx: PassContext) -> fx.GraphModule:
    """Symbolically trace an eval-mode deep copy of ``model``, on the CPU (calibration moves it to
    wherever the calibration batches are; the integer graph runs on the CPU).

    Before: any ``nn.Module``. After: a ``GraphModule`` with the same submodules and the same
    numerics; calls on the model's own tensors alone (a standardized weight) are computed once, a
    layer its module computes with ``F.linear``/``F.conv2d``/``F.batch_norm`` on its own
    tensors is a call of the torch module it is, a
    ``stack`` the ``cat`` of unsqueezed tensors, fused attention the matrix products and softmax
    it fuses (`fxq.graphs.canonical`). A submodule ``overrides`` maps
    to None is kept whole, as one call that runs in float: the way to quantize a model around a
    part torch.fx cannot trace.

    A model whose Python code computes with sizes (padding from ``x.shape``, ``if h != H``) is
    traced again with the first calibration sample's sizes as constants (`fxq.graphs.shapes`; the batch
    size stays free, the quantized model checks every input's shape). Submodules that still
    cannot be traced (control flow on tensor values) are all found in this call and refused in
    one ``TypeError`` naming each source line, with the ways out; so is code outside any
    submodule.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxq.quantize takes an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval().cpu()
    overrides = ctx.overrides if ctx is not None else {}
    opaque = tuple(pattern for pattern, config in overrides.items() if config is None)
    with _through_other_wraps():
        tracer, graph = _traced(model, opaque, ctx)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if getattr(tracer, "specialized", False):
        records.put(next(n for n in gm.graph.nodes if n.op == "placeholder"),
                    records.FixedShape(tuple(tracer.example.shape[1:])))
    assign.functional_assignments(gm)
    _one_module_per_call_site(gm)
    canonical.dtype_reads_as_casts(gm, probe(gm, ctx, lambda value: value.dtype))
    canonical.fold_parameter_math(gm)
    _fold_size_tensors(gm, ctx)
    shape_of = probe(gm, ctx, lambda value: tuple(value.shape))
    canonical.layers_from_functions(gm, _rank_probe(gm, shape_of), ops.FUNCTIONAL_LAYERS)
    canonical.attention_as_matmuls(gm, shape_of)
    canonical.stack_as_cat(gm)
    _check_one_input(gm, model)
    gm.graph.lint()
    gm.recompile()
    return gm


def _traced(model: nn.Module, opaque: tuple[str, ...], ctx: PassContext | None):
    tracer = _PathTracer(opaque)
    try:
        return tracer, tracer.trace(model)
    except Exception as error:  # torch.fx raises several types; all mean "cannot trace"
        example = _example(ctx)
        if example is None:
            raise _untraceable(model, tracer, error) from error
        return _trace_with_sizes(model, opaque, example)


@contextlib.contextmanager
def _through_other_wraps():
    """Trace through the functions other packages mark with ``torch.fx.wrap`` (torchvision's
    ``shifted_window_attention``): kept as one call, such a function would be code that fxq can
    neither quantize nor save. fxq's own marks stay."""
    table = _symbolic_trace._wrapped_fns_to_patch
    foreign = {key: frame for key, frame in table.items()
               if not str(frame.get("__name__", "")).startswith(("fxq.", "passes."))}
    for key in foreign:
        del table[key]
    try:
        yield
    finally:
        table.update(foreign)


def _fold_size_tensors(gm: fx.GraphModule, ctx: PassContext) -> None:
    """`sized.fold_size_tensors` and `sized.pads_from_sizes` on the first calibration
    sample; a graph they changed is made for that sample's size, and its input checks it (as a
    size-specialized trace's does)."""
    example = None

    def values_at(batch: int) -> dict:  # asked only if the graph makes a tensor from sizes
        nonlocal example
        example = _example(ctx) if example is None else example
        values: dict = {}
        run_recording(gm, example.expand(batch, *example.shape[1:]), values.__setitem__)
        return values

    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    try:
        folded = sized.fold_size_tensors(gm, values_at) + sized.pads_from_sizes(gm, values_at)
    except Exception:  # a model that fails on its calibration data is calibrate's to report, with its reason
        return
    if folded and not records.has(placeholder, records.FixedShape):
        records.put(placeholder, records.FixedShape(tuple(example.shape[1:])))


class _SizedTracer(shapes.ConcreteShapes, _PathTracer):
    """`_PathTracer` answering size queries with the example input's sizes (`fxq.graphs.shapes`)."""


def _trace_with_sizes(model: nn.Module, opaque: tuple[str, ...], example: torch.Tensor):
    """Trace with the example's sizes as constants. A submodule that still cannot be traced
    (control flow on tensor values) is set aside and the trace retried, so that every such
    submodule is found in this one call; then all are refused together, by name and source line
    (`_untraceable_parts`): kept in float they would be the model's own code, which a file never
    holds — quantize would succeed and save fail. An ``overrides`` entry mapping a submodule to
    None keeps it whole on the user's word (it is never traced)."""
    islands: dict[str, str] = {}
    while True:
        tracer = _SizedTracer(opaque + tuple(islands))
        tracer.example = example
        try:
            graph = tracer.trace(model)
        except Exception as error:  # torch.fx raises several types; all mean "cannot trace"
            if not tracer.failed_in or tracer.failed_in in islands:
                raise _untraceable(model, tracer, error) from error
            islands[tracer.failed_in] = f"{_user_line(error)}: {type(error).__name__}: {error}"
            continue
        if islands:
            raise _untraceable_parts(model, islands)
        shapes.forget_examples(graph)
        return tracer, graph


def _untraceable(model: nn.Module, tracer: _PathTracer, error: Exception) -> TypeError:
    where = f"submodule '{tracer.failed_in}'" if tracer.failed_in else "the top-level module"
    return TypeError(
        f"torch.fx cannot trace {type(model).__name__}: in {where} ({_user_line(error)}): "
        f"{type(error).__name__}: {error}. Fix: replace Python control flow on tensor values "
        "with tensor ops (torch.where, masking), or move the untraceable code into a submodule and "
        f"keep it whole and in float with overrides={{'{tracer.failed_in or 'name'}': None}} (it then "
        "runs in this process only: a file never holds code)")


def _untraceable_parts(model: nn.Module, islands: dict[str, str]) -> TypeError:
    parts = "".join(f"\n  '{path}': {why}" for path, why in islands.items())
    kept = ", ".join(f"'{path}': None" for path in islands)
    return TypeError(
        f"torch.fx cannot trace {len(islands)} submodule(s) of {type(model).__name__}:{parts}\n"
        "Fix: replace Python control flow on tensor values with tensor ops (torch.where, masking) so that "
        "fxq can quantize them; or, to run them whole in float in this process only, pass "
        f"overrides={{{kept}}} — fxq.save and fxq.deploy then refuse the model, as a file never holds code")


def _example(ctx: PassContext | None) -> torch.Tensor | None:
    """The first calibration sample, as a float batch of one (None if there is none to take)."""
    try:
        x = batch_input(next(iter(ctx.calib_loader)), 0)[:1].detach().cpu()
    except Exception:  # no or bad calibration data is calibrate's to report, with its reason
        return None
    return x if x.is_floating_point() and torch.isfinite(x).all() else None


def _one_module_per_call_site(gm: fx.GraphModule) -> None:
    """A module called at several places (``self.relu`` twice in a ResNet block, a conv applied to
    two inputs) gets a copy per extra site, registered beside it (``relu`` → ``relu_1``), so every
    site is quantized with its own parameters. The copies share the parameter tensors until a
    pass replaces them, so equal weights stay one set of integers (`fxq.integers.weight_ranges`); each
    site's node records the module's original path (`fxq.graphs.graph.module_name`)."""
    sites: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sites.setdefault(node.target, []).append(node)
    for target, nodes in sites.items():
        if len(nodes) < 2:
            continue
        module = gm.get_submodule(target)
        for node in nodes[1:]:
            shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
            leaf = target.rpartition(".")[2]
            node.target = add_module_near(gm, node, leaf, copy.deepcopy(module, memo=shared))
        for node in nodes:
            records.put(node, records.Origin(target))


def probe(gm: fx.GraphModule, ctx: PassContext, fact: Callable[[torch.Tensor], object]):
    """``fact_of(node)``: ``fact`` of a tensor value (its shape, its dtype) on one calibration
    image, run through the graph only when first asked (None if unknown: the call asking is left
    as it is)."""
    facts: dict | None = None

    def fact_of(node: fx.Node):
        nonlocal facts
        if facts is None:
            facts = _facts(gm, ctx, fact)
        return facts.get(node)
    return fact_of


def _rank_probe(gm: fx.GraphModule, shape_of):
    """``rank_of(node)``: a value's number of dims; a layer's whose type fixes it without running
    the graph (a conv's)."""
    def rank_of(node: fx.Node) -> int | None:
        weights = ops.weights_of(gm.get_submodule(node.target)) if node.op == "call_module" else None
        if weights is not None and weights.output_rank is not None:
            return weights.output_rank
        shape = shape_of(node)
        return None if shape is None else len(shape)
    return rank_of


def _facts(gm: fx.GraphModule, ctx: PassContext, fact: Callable[[torch.Tensor], object]) -> dict:
    facts = {}

    def record(n: fx.Node, value) -> None:
        if isinstance(value, torch.Tensor):
            facts[n] = fact(value)

    try:
        run_recording(gm, batch_input(next(iter(ctx.calib_loader)), 0)[:1].cpu(), record)
    except Exception:  # bad calibration data is calibrate's to report, with its reason
        return {}
    return facts


def _check_one_input(gm: fx.GraphModule, model: nn.Module) -> None:
    inputs = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise TypeError(
            f"{type(model).__name__}.forward takes {len(inputs)} inputs ({', '.join(inputs) or 'none'}); "
            "fxq quantizes models with one tensor input. Fix: wrap the model in a module whose "
            "forward takes one tensor (e.g. fixed extra arguments as attributes)")


_TRACER_FILES = frozenset(Path(m.__file__).resolve() for m in (shapes, sys.modules[__name__]))


def _user_line(error: BaseException) -> str:
    """The last traceback frame outside torch and fxq's tracer: the user's line that failed to trace."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "/torch/" not in f.filename and Path(f.filename).resolve() not in _TRACER_FILES]
    if not frames:
        return "unknown line"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {frame.line}"
