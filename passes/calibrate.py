"""calibrate: run the calibration loader through the observed graph so every observer fills."""
from __future__ import annotations

import contextlib

import torch
from torch import fx

from fxq import distributed
from fxq.graphs import records
from fxq.graphs.context import PassContext
from fxq.graphs.graph import finish, label, run_recording, source_line
from fxq.integers.observers import InputGram, Observer

KEPT_SAMPLES = 8  # calibration samples kept for the integer ranges `fxq.explain` shows
CHANNELS_LAST_PIXELS = 96 * 96  # measured: 28×28 MNIST runs 11 % slower channels-last, 224×224 28 % faster


def calibrate(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Feed every batch of ``ctx.calib_loader`` through the graph once (eval mode, no grad), on the
    device of the first batch (CUDA batches: calibration on the GPU), then return it to the CPU.

    The graph does not change; its observers accumulate statistics. A batch is a tensor or a
    tuple/list whose first item is the input (``(images, labels)`` from a DataLoader). Raises a
    ``ValueError`` for an empty loader, a batch with NaN/Inf, or a batch the model cannot run on
    (wrong shape), and a ``TypeError`` for a batch that is not a float tensor.
    """
    gm.eval()
    learning = learning_samples(ctx)
    batches, samples, sample_shape, kept = _synchronized(gm, ctx.calib_loader, max(KEPT_SAMPLES, learning))
    if batches == 0:
        raise ValueError(
            "calib_loader yielded no batches: pass a non-empty DataLoader or list of input "
            "batches (a few hundred training images are typical)"
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    _check_not_constant(gm, placeholders[0])
    records.put(placeholders[0], records.Calibration(batches, samples, sample_shape,
                                                     None if kept is None else kept[:KEPT_SAMPLES],
                                                     kept if learning else None))
    return finish(gm)


def learning_samples(ctx: PassContext) -> int:
    """How many calibration samples `passes.reconstruct` learns on: the most any layer's config asks."""
    configs = [ctx.config_for(name) for name in ctx.layers]
    return max([c.reconstruct_samples for c in configs if c is not None and c.reconstruct], default=0)


def _check_not_constant(gm: fx.GraphModule, placeholder: fx.Node) -> None:
    """Ranges measured on one repeated value (all-zero batches, a blank image) fit nothing real."""
    for user in placeholder.users:
        observer = gm.get_submodule(user.target) if user.op == "call_module" else None
        if isinstance(observer, Observer) and observer.observed and observer.min_val == observer.max_val:
            raise ValueError(
                f"every calibration input value is {observer.min_val.item():g}: ranges measured on "
                "constant data fit no real input. Calibrate on real samples (a few hundred "
                "training images)")


def _one_pass(gm: fx.GraphModule, loader, keep: int) -> tuple[int, int, tuple[int, ...] | None, torch.Tensor | None]:
    fixed = records.get(next(n for n in gm.graph.nodes if n.op == "placeholder"), records.FixedShape)
    batches = samples = 0
    kept: list[torch.Tensor] = []  # the first samples, which `fxq.explain` runs through the integer graph
    sample_shape = None
    layout = torch.contiguous_format
    device = None
    with torch.no_grad():
        for index, item in enumerate(loader):
            x = batch_input(item, index)
            if fixed is not None:
                _check_fixed_shape(x, index, fixed)
            if sample_shape is None:  # the model and its observers run where the batches are (a GPU)
                sample_shape, device = tuple(x.shape[1:]), x.device
                gm.to(device)
                layout = _layout(gm, x)
            _run(gm, x.to(device, memory_format=layout), index)
            batches, samples = batches + 1, samples + x.shape[0]
            if samples - x.shape[0] < keep:
                kept.append(x[:keep - (samples - x.shape[0])].detach().cpu())
    gm.to("cpu", memory_format=torch.contiguous_format)  # what follows is integer and CPU
    return batches, samples, sample_shape, torch.cat(kept) if kept else None


def _check_fixed_shape(x: torch.Tensor, index: int, fixed: records.FixedShape) -> None:
    if tuple(x.shape[1:]) != fixed.sample_shape:
        raise ValueError(
            f"calibration batch {index} holds samples of shape {tuple(x.shape[1:])}, but the model's "
            f"code computes with its input's size (padding or reshapes from x.shape), so fxq traced "
            f"it for the first sample's shape {fixed.sample_shape}. Fix: calibrate (and run) the "
            "model on inputs of one size")


def _synchronized(gm: fx.GraphModule, loader,
                  keep: int) -> tuple[int, int, tuple[int, ...] | None, torch.Tensor | None]:
    """One pass over this process's data; in a process group (`fxq.distributed`), over each
    rank's shard, then every observer synchronized: each rank holds what one process observing
    the union would hold, and the counts are the union's. A rank may hold no batches. The samples
    kept for `passes.reconstruct` are every rank's, in rank order: each rank learns on all of them."""
    if not distributed.active():
        return _one_pass(gm, loader, keep)
    error = stats = None
    try:
        stats = _one_pass(gm, loader, keep)
    except Exception as caught:  # every rank must learn of it before the collectives below
        error = caught
    distributed.agree(error)
    for module in gm.modules():  # the same modules in the same order on every rank
        if isinstance(module, (Observer, InputGram)):
            module.synchronize()
    shapes = [shape for shape in distributed.gather(stats[2]) if shape is not None]
    counts = distributed.reduce_sum(torch.tensor(stats[:2], dtype=torch.int64))
    kept = stats[3]
    if keep > KEPT_SAMPLES:  # reconstruction learns the same on every rank: on the union, in rank order
        parts = [t for t in distributed.gather(kept) if t is not None]
        kept = torch.cat(parts)[:keep] if parts else None
    return int(counts[0]), int(counts[1]), shapes[0] if shapes else None, kept


def _layout(gm: fx.GraphModule, x: torch.Tensor) -> torch.memory_format:
    """The memory layout calibration runs the model in. The observers see the same values either
    way, and CPU convolutions on large maps run ~30 % faster channels-last (on small ones a little
    slower), so images of at least ``CHANNELS_LAST_PIXELS`` run channels-last when the model runs
    in it at all (tried on one sample, observers paused: a model that ``view``s its activations
    needs the contiguous layout). Decided by the input's shape, never by a timing, so the same
    data always gives the same model."""
    if x.dim() != 4 or x.shape[2] * x.shape[3] < CHANNELS_LAST_PIXELS:
        return torch.contiguous_format
    gm.to(memory_format=torch.channels_last)
    try:
        with paused(gm):
            gm(x[:1].to(memory_format=torch.channels_last))
        return torch.channels_last
    except Exception:  # any failure here: the contiguous run reports real errors properly
        gm.to(memory_format=torch.contiguous_format)
        return torch.contiguous_format


@contextlib.contextmanager
def paused(gm: fx.GraphModule):
    """Run ``gm`` without its observers recording anything."""
    observers = [m for m in gm.modules() if isinstance(m, (Observer, InputGram))]
    for m in observers:
        m.recording = False
    try:
        yield
    finally:
        for m in observers:
            m.recording = True


def batch_input(item: object, index: int) -> torch.Tensor:
    """The input tensor of one loader item, checked: a float tensor with a batch dim, finite."""
    x = item[0] if isinstance(item, (tuple, list)) and item else item
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(
            f"calibration batch {index} is {kind}: each item must be a float tensor "
            "or a tuple/list whose first element is one, e.g. (images, labels)"
        )
    if x.dim() < 2:
        raise ValueError(
            f"calibration batch {index} has shape {tuple(x.shape)}: give a batch dimension "
            "first, e.g. [N, C, H, W] (use x.unsqueeze(0) for a single image)"
        )
    if not torch.isfinite(x).all():
        raise ValueError(
            f"calibration batch {index} contains NaN or Inf: clean or filter the calibration "
            "data before quantizing"
        )
    return x


def _run(gm: fx.GraphModule, x: torch.Tensor, index: int) -> None:
    try:
        gm(x)
    except (RuntimeError, AssertionError) as error:  # a shape mismatch, a model's own shape assertion
        node = _failing_node(gm, x)
        where = ""
        if node is not None:
            line = source_line(node)
            where = f" at {label(node)} ({node.format_node()}{f', {line}' if line else ''})"
        raise ValueError(
            f"calibration batch {index} of shape {tuple(x.shape)} cannot run through the model{where}: "
            f"{_first_line(error)}. Pass batches shaped like the model's training inputs"
        ) from error


def _failing_node(gm: fx.GraphModule, x: torch.Tensor) -> fx.Node | None:
    """The node that raises on ``x``, found by running the graph again node by node (only after
    a failure: the compiled graph is faster)."""
    ran = set()
    try:
        run_recording(gm, x, lambda n, _: ran.add(n))
    except Exception:
        pass
    failed = [n for n in gm.graph.nodes if n not in ran]
    return failed[0] if failed else None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
