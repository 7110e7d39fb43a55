"""The graph dump: one row per node (op, target, shape, dtype, scale, zero point), and the same
graph as a networkx DiGraph for GraphML/DOT tools."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxq.graphs import records
from fxq.integers.affine import ActQParams
from fxq.integers.observers import Observer


@dataclass(frozen=True)
class Row:
    node: str
    op: str
    target: str
    shape: str
    dtype: str
    scale: str
    zero_point: str


def rows(gm: fx.GraphModule, example: torch.Tensor) -> list[Row]:
    """One :class:`Row` per node of ``gm``, shapes and dtypes from running ``example`` through it.

    Scale and zero point come from the convert pass; before it, from what an observer has seen."""
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    return [_row(node, modules) for node in gm.graph.nodes]


def _row(node: fx.Node, modules) -> Row:
    meta = node.meta.get("tensor_meta")
    shape = "×".join(map(str, meta.shape)) if hasattr(meta, "shape") else ""
    dtype = str(meta.dtype).replace("torch.", "") if hasattr(meta, "dtype") else ""
    qp = records.get(node, ActQParams)
    if qp is None and node.op == "call_module" and isinstance(modules.get(node.target), Observer):
        observer = modules[node.target]
        qp = observer.qparams() if observer.observed else None
    return Row(node.name, node.op, _target(node), shape, dtype,
               f"{qp.scale:.6g}" if qp else "", str(qp.zero_point) if qp else "")


def _target(node: fx.Node) -> str:
    if node.op in ("placeholder", "output", "call_module", "get_attr", "call_method"):
        return str(node.target)
    return f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}".lstrip(".")


def to_networkx(gm: fx.GraphModule, table: list[Row]) -> nx.DiGraph:
    """The dataflow as a DiGraph: one vertex per node with its row's fields as attributes."""
    graph = nx.DiGraph()
    for row in table:
        graph.add_node(row.node, **asdict(row))
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text for ``graph`` (labels: node, target, shape, dtype, scale/zero point)."""
    lines = ["digraph fxq {", "  node [shape=box, fontname=monospace];"]
    for name, attrs in graph.nodes(data=True):
        label = "\\n".join(v for v in (name, attrs["target"], attrs["shape"], attrs["dtype"],
                                       _qp_text(attrs)) if v)
        lines.append(f'  "{name}" [label="{label}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in graph.edges]
    return "\n".join(lines + ["}"]) + "\n"


def _qp_text(attrs: dict) -> str:
    return f"s={attrs['scale']} z={attrs['zero_point']}" if attrs["scale"] else ""
