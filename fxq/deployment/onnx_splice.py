"""A float op without an ONNX form of fxq's own, exported by torch.onnx and spliced into fxq's
graph: the call is wrapped as a module whose inputs are the op's tensor arguments, exported
with the TorchScript-based exporter (dynamic batch), and its nodes and initializers are added
under fresh names, its inputs wired to the values fxq's graph already holds.

torch.onnx's TorchScript exporter is deprecated; whether this torch still has it is checked
when it is called, and its absence raises an error naming the op."""
from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import fx, nn

OPSET = 20  # the newest the TorchScript exporter writes; fxq's graph (opset 21) runs its ops unchanged


class _Call(nn.Module):
    """One fx call as a module of its tensor arguments (everything else is fixed)."""

    def __init__(self, node: fx.Node, module: nn.Module | None, arguments: list[fx.Node]):
        super().__init__()
        self.node, self.arguments = node, arguments
        self.module = copy.deepcopy(module) if module is not None else None
        if self.module is not None:  # torch's layers take fused inference kernels, which do not export,
            self.module.requires_grad_(True)  # only when no gradient is asked for (MultiheadAttention)

    def forward(self, *tensors):
        value = dict(zip(self.arguments, tensors))
        args, kwargs = fx.map_arg(self.node.args, value.get), fx.map_arg(self.node.kwargs, value.get)
        if self.node.op == "call_module":
            return self.module(*args, **kwargs)
        if self.node.op == "call_method":
            return getattr(args[0], self.node.target)(*args[1:], **kwargs)
        return self.node.target(*args, **kwargs)


def splice(b, node: fx.Node, module: nn.Module | None):
    """Export ``node``'s call and add it to the builder ``b``; its output name(s)."""
    import onnx

    if module is not None and not type(module).__module__.startswith("torch."):
        raise ValueError(f"node '{node.name}' is the model's own {type(module).__name__}, kept whole in float: "
                         "torch.onnx would trace one path through its Python code, so fxq does not export it. "
                         "Make it traceable (fxq then quantizes inside it)")
    arguments = list(dict.fromkeys(node.all_input_nodes))
    names = [b.values[a] for a in arguments]
    if any(not isinstance(n, str) for n in names):
        raise ValueError(f"node '{node.name}' runs in float on sizes computed from the input; it does not export")
    examples = tuple(_example(b, a) for a in arguments)
    proto = onnx.load_from_string(_exported(_Call(node, module, arguments), examples, node, b))
    graph = proto.graph
    renamed = dict(zip((i.name for i in graph.input), names))
    for init in graph.initializer:
        renamed[init.name] = b.constant(f"{node.name}_{init.name}", onnx.numpy_helper.to_array(init))
    for inner in graph.node:
        outputs = [_fresh(b, renamed, f"{node.name}_{o}") if o else "" for o in inner.output]
        for name, fresh in zip(inner.output, outputs):
            renamed[name] = fresh
        copy_of = onnx.NodeProto()
        copy_of.CopyFrom(inner)
        copy_of.name = outputs[0] if outputs[0] else b.fresh(node.name)
        copy_of.ClearField("input")
        copy_of.input.extend(renamed.get(i, i) if i else "" for i in inner.input)
        copy_of.ClearField("output")
        copy_of.output.extend(outputs)
        b.nodes.append(copy_of)
    results = [renamed[o.name] for o in graph.output]
    return results[0] if len(results) == 1 else results


def _fresh(b, renamed: dict, name: str) -> str:
    return b.fresh(name.replace("/", "_").replace(":", "_").replace(".", "_"))


def _example(b, argument: fx.Node) -> torch.Tensor:
    """A tensor of the argument's shape and dtype on the export's example run."""
    return torch.zeros(b.shape_of(argument), dtype=b.dtype_of(argument))


def _exported(call: _Call, examples: tuple, node: fx.Node, b) -> bytes:
    inputs = [f"in{i}" for i in range(len(examples))]
    dynamic = {name: {d: f"batch{d}" for d in b.batched_dims(a)} for name, a in zip(inputs, call.arguments)}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(call, examples, buffer, dynamo=False, opset_version=OPSET, input_names=inputs,
                              dynamic_axes=dynamic, do_constant_folding=True)
    except Exception as error:  # an op the exporter does not take, or an exporter torch dropped
        what = type(call.module).__name__ if call.module is not None else getattr(node.target, "__name__", node.target)
        raise ValueError(f"node '{node.name}' ({what}) runs in float and torch.onnx (TorchScript exporter, "
                         f"torch {torch.__version__}) could not export it: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}") from error
    return buffer.getvalue()
