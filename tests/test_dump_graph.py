import networkx as nx

import fxq
from fxq.graphs import dump
from tests.helpers import Residual, randomize_bn


def _through(name: str) -> list:
    """The pipeline up to and including the pass called ``name``."""
    names = [p.__name__ for p in fxq.PASSES]
    return fxq.PASSES[:names.index(name) + 1]


def test_rows_after_convert_show_dtypes_scales_and_zero_points(ctx):
    gm = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, passes=_through("convert"))
    table = {r.node: r for r in dump.rows(gm, ctx.calib_loader[0])}
    assert table["x"].dtype == "float32"
    conv = table["unit_conv"]
    assert (conv.op, conv.target, conv.shape, conv.dtype) == ("call_module", "unit.conv", "4×3×8×8", "uint8")
    assert float(conv.scale) > 0 and 0 <= int(conv.zero_point) <= 255
    assert table["unit_relu"].target == "unit.relu"
    assert table["unit_relu"].zero_point == conv.zero_point  # ReLU keeps its input's parameters


def test_observer_rows_show_the_range_seen_so_far(ctx):
    gm = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader, passes=_through("calibrate"))
    table = {r.node: r for r in dump.rows(gm, ctx.calib_loader[0])}
    assert table["observers_x"].scale != "" and table["x"].scale == ""


def test_networkx_graph_mirrors_the_fx_graph_and_writes_graphml_and_dot(ctx, tmp_path):
    gm = fxq.quantize(randomize_bn(Residual()), ctx.calib_loader)
    table = dump.rows(gm, ctx.calib_loader[0])
    graph = dump.to_networkx(gm, table)
    assert graph.number_of_nodes() == len(list(gm.graph.nodes))
    assert graph.has_edge("unit_relu", "conv2") and graph.has_edge("quantize_x", "add")
    nx.write_graphml(graph, tmp_path / "g.graphml")
    assert nx.read_graphml(tmp_path / "g.graphml").nodes["add"]["dtype"] == "uint8"
    dot = dump.to_dot(graph)
    assert dot.startswith("digraph fxq {") and '"unit_relu" -> "conv2";' in dot
