"""Tiny models the pass tests are built on, graph-reading helpers, and running the command."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

from fxq.analysis.comparison import sqnr_db
from fxq.graphs.graph import run_recording
from fxq.graphs.outputs import named
from fxq.integers import gemm

# torch._int_mm where this CPU's kernel gets it wrong (gemm.exact's probe): fxq never runs it there, and tests
# of the int8 GEMM itself have nothing to check
EXACT_BACKENDS = [b for b in gemm.Backend if b in gemm.exact("cpu")]
needs_exact_int8_gemm = pytest.mark.skipif(gemm.Backend.INTEGER not in EXACT_BACKENDS,
                                           reason="torch._int_mm gives wrong integers on this CPU; fxq does not use it")


def threads() -> int:
    """This test process's share of the cores: all of them, or 1/n of them under n pytest-xdist workers
    (two workers of two threads each on two cores wait on each other: the unit loop took 69 s, not 23)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


class ConvBnRelu(nn.Module):
    """conv → bn → relu, the unit every CNN repeats."""

    def __init__(self, cin=3, cout=4):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    """A basic block: conv-bn-relu, conv-bn, += identity, relu; then pool and a classifier."""

    def __init__(self, c=3):
        super().__init__()
        self.unit = ConvBnRelu(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        out = self.bn2(self.conv2(self.unit(x)))
        out += x
        out = torch.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics, so folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def ops(gm: fx.GraphModule) -> list[tuple[str, object]]:
    """(op, target type or function) for each call node: the graph's structure at a glance."""
    modules = dict(gm.named_modules())
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append((n.op, type(modules[n.target])))
        elif n.op in ("call_function", "call_method"):
            out.append((n.op, n.target))
    return out


def module_types(gm: fx.GraphModule) -> list[type]:
    return [t for op, t in ops(gm) if op == "call_module"]


class Chain(nn.Module):
    """conv → relu → maxpool → conv → relu → conv, with channels of very different ranges."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1),
                                              nn.Conv2d(6, 4, 1))
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():  # channel ranges spread over two decades, as in real networks
            for conv in (self.conv1, self.conv2):
                spread = torch.logspace(-1, 1, conv.out_channels)[torch.randperm(conv.out_channels, generator=g)]
                conv.weight.mul_(spread.reshape(-1, 1, 1, 1))

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(self.pool(torch.relu(self.conv1(x))))))


def output_steps(qmodel: fx.GraphModule, twin: fx.GraphModule, x: torch.Tensor):
    """The integer model's and its twin's outputs on ``x``, as integer steps of each output's scale
    (all outputs flattened into one tensor where the model returns several)."""
    from fxq.deployment.onnx_export import output_leaves
    output = next(n for n in qmodel.graph.nodes if n.op == "output")
    steps = [qmodel.get_submodule(leaf.target).scale.item() for leaf in output_leaves(output)]
    with torch.no_grad():
        ours, theirs = named(qmodel(x)), named(twin(x))
    if len(steps) == 1:  # one output, in its own shape
        return tuple(torch.round(values[0][1].double() / steps[0]) for values in (ours, theirs))
    return tuple(torch.cat([torch.round(t.double() / step).flatten() for (_, t), step in zip(values, steps)])
                 for values in (ours, theirs))


def node_values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, object]:
    """What every node of ``gm`` produced on ``x``, by node name."""
    values = {}
    run_recording(gm, x, lambda n, value: values.__setitem__(n.name, value))
    return values


def check_quantized(qmodel: fx.GraphModule, model: nn.Module, x: torch.Tensor, tmp_path) -> float:
    """The checks every quantized model must pass: the twin agrees bit for bit, save → load gives
    the same outputs; returns the logits' SQNR against the float model in dB."""
    import fxq
    integer, simulated = output_steps(qmodel, fxq.simulate(qmodel), x)
    assert torch.equal(integer, simulated)
    fxq.save(qmodel, tmp_path / "model.fxq")
    loaded = fxq.load(tmp_path / "model.fxq")
    with torch.no_grad():
        ours = named(qmodel(x))
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named(loaded(x)), ours))
        return min(sqnr_db(reference, q) for (_, reference), (_, q) in zip(named(model(x)), ours))


def assert_deploys_bit_exact(qmodel: fx.GraphModule, x: torch.Tensor, saved: Path | None = None) -> None:
    """``qmodel`` (or the model ``saved`` there) deployed in onnxruntime with the exact weight
    formats gives ``qmodel``'s very logits on ``x`` (it was quantized with onnxruntime's rounding)."""
    import fxq
    deployed = fxq.deploy(fxq.load(saved) if saved else qmodel, x[:1], threads=1, weights="exact")
    with torch.no_grad():
        theirs, ours = named(deployed(x)), named(qmodel(x))
    assert deployed.bit_exact and [n for n, _ in theirs] == [n for n, _ in ours]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(theirs, ours))


def images(size: int, seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Three calibration batches of 8 random 3×size×size images and a test batch of 6."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=g) for _ in range(3)], torch.randn(6, 3, size, size, generator=g)


def quantize_whole(model: nn.Module, calib: list, x: torch.Tensor, tmp_path, requantize: str = "onnxruntime",
                   min_sqnr: float = 25.0) -> fx.GraphModule:
    """``model`` quantized with no op in float (a fallback warning fails the test) and checked:
    no float op runs on ``x``, the twin and a saved copy agree, the SQNR against the float model
    exceeds ``min_sqnr``, and with onnxruntime's rounding the deployed model is bit-exact."""
    import warnings

    import fxq
    from fxq.graphs.runtime import count_ops
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxq.FloatFallbackWarning)
        qmodel = fxq.quantize(model, calib, fxq.QConfig(requantize=requantize))
    assert count_ops(qmodel, x).float == 0
    assert check_quantized(qmodel, model, x, tmp_path) > min_sqnr
    if requantize == "onnxruntime":
        assert_deploys_bit_exact(qmodel, x, tmp_path / "model.fxq")
    return qmodel


ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


def run_fxq(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The installed ``fxq`` command, as a user runs it (MNIST read from the repository's cache)."""
    command = Path(sys.executable).parent / "fxq"
    env = {**os.environ, "FXQ_DATA": str(ROOT / "data")}
    return subprocess.run([str(command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def images_shown(page: Path) -> tuple[int, int]:
    """(images on the page, images a headless Chromium decoded) for an HTML file: a copy of the
    page with a probe script that counts them once the page has loaded."""
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    assert browser, "no headless Chromium: `make setup` installs Debian's chromium-headless-shell"
    probe = ("<script>addEventListener('load', () => { const all = [...document.images]; "
             "document.body.dataset.images = all.length + '/' + "
             "all.filter(i => i.complete && i.naturalWidth > 0).length; });</script></body>")
    copy = page.with_name("probe.html")
    copy.write_text(page.read_text().replace("</body>", probe))
    dom = subprocess.run([browser, "--no-sandbox", "--disable-gpu", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images="(\d+)/(\d+)"', dom)
    assert found, f"the browser did not render {page}: {dom[:300]!r}"
    return int(found[1]), int(found[2])
