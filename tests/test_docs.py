"""docs/adding_an_op.md names what exists: every family of the registry and only those, the helper
modules, and each entry, field and function it walks through."""
import importlib
import re
from dataclasses import fields
from pathlib import Path

import fxq.ops as ops
from fxq.ops.base import Op

PAGE = (Path(__file__).resolve().parent.parent / "docs" / "adding_an_op.md").read_text()


def _section(title: str) -> str:
    return PAGE.split(f"## {title}")[1].split("\n## ")[0]


def test_the_family_table_lists_every_registry_family_in_order():
    listed = re.findall(r"^\| `fxq/ops/(\w+)\.py` \|", PAGE, flags=re.M)
    families = []
    for op in ops.REGISTRY:
        family = next(name for name in listed + [None] if name is None
                      or op in getattr(importlib.import_module(f"fxq.ops.{name}"), "OPS", ()))
        assert family is not None, f"{op} is in no family the page lists"
        if family not in families:
            families.append(family)
    assert families == listed


def test_every_module_path_named_exists_and_helpers_are_no_families():
    root = Path(ops.__file__).parent
    for name in set(re.findall(r"fxq/ops/(\w+)\.py", PAGE)):
        assert (root / f"{name}.py").exists(), name
    for helper in ("base", "weighted", "qlayer", "lookup", "joins", "fallback"):
        assert not getattr(importlib.import_module(f"fxq.ops.{helper}"), "OPS", ()), helper


def test_the_walked_entries_have_the_fields_and_values_the_page_gives():
    from fxq.ops.convolutions import CONV1D
    from fxq.ops.padding import PAD, QPad, lower_pad
    walked = ("modules", "functions", "accepts", "integer_modules", "homogeneous", "channelwise", "example",
              "weights", "rewrite", "absorbs_activation", "lower")
    for field in walked:
        assert field in {f.name for f in fields(Op)} and f"`{field}" in PAGE, field
    assert PAD.lower is lower_pad and PAD.integer_modules == (QPad,) and PAD.homogeneous and PAD.channelwise
    assert PAD.output is ops.Output.SAME
    assert CONV1D.weights.output_axis == 0 and CONV1D.weights.output_rank == 3 and CONV1D.rewrite is not None
    assert CONV1D.absorbs_activation
    for facet in ("schema", "twin", "to_onnx"):
        assert hasattr(QPad, facet) and f"`{facet}" in _section("A weightless op: padding"), facet
