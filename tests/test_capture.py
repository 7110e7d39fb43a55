"""What torch.fx captures whole: forwards with optional inputs, iterated splits, branches on
cached sizes and grids made from sizes (the shapes Ultralytics' and timm's models are written in)."""
import pytest
import torch
from torch import nn

import fxq
from fxq.graphs.runtime import count_ops
from passes.trace import trace
from tests.helpers import images, quantize_whole


class OptionalInputs(nn.Module):
    """timm's ViT: ``forward(x, attn_mask=None, is_causal=False)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale=None, negate=False):
        y = self.conv(x)
        if scale is not None:
            y = y * scale
        return -y if negate else y


class VarArgs(nn.Module):
    """Ultralytics' ``DetectionModel.forward(x, *args, **kwargs)`` → ``self.predict(x, *args, **kwargs)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, *args, **kwargs):
        return self.predict(x, *args, **kwargs)

    def predict(self, x, profile=False):
        return self.conv(x)


class IteratedSplit(nn.Module):
    """Ultralytics' C2f: ``y = list(self.cv1(x).chunk(2, 1))``, extended in a loop, then joined."""

    def __init__(self):
        super().__init__()
        self.cv1, self.m, self.cv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = list(torch.relu(self.cv1(x)).chunk(2, 1))
        y.extend(torch.relu(self.m(y[-1])) for _ in range(1))
        rows = [row * 1.0 for row in torch.relu(self.cv2(torch.cat(y, 1))).unbind(2)]
        return torch.stack(rows, 2)


class CachedGrid(nn.Module):
    """Ultralytics' Detect head: a grid rebuilt when the input's shape differs from the one it
    cached (``if self.shape != shape``), made by ``arange().type_as(x)`` and ``x.new_full``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.shape = None

    def forward(self, x):
        y = self.conv(x)
        if self.shape != y.shape:
            h, w = y.shape[2:]
            rows, cols = torch.meshgrid(torch.arange(h).type_as(y), torch.arange(w).type_as(y), indexing="ij")
            self.grid = torch.stack((cols, rows)) * y.new_full((2, 1, 1), 0.5)
            self.shape = y.shape
        return y + self.grid


def _quantized(model, tmp_path, size=8):
    calibration, x = images(size)
    torch.manual_seed(0)
    return quantize_whole(model.eval(), calibration, x, tmp_path), x


def test_optional_inputs_are_traced_with_their_defaults(tmp_path):
    torch.manual_seed(0)
    qmodel, x = _quantized(OptionalInputs(), tmp_path)
    assert [n.target for n in qmodel.graph.nodes if n.op == "placeholder"] == ["x"]


def test_a_forward_of_star_args_is_traced_with_the_one_input_given(tmp_path):
    torch.manual_seed(0)
    qmodel, _ = _quantized(VarArgs(), tmp_path)
    assert [n.target for n in qmodel.graph.nodes if n.op == "placeholder"] == ["x"]


def test_a_second_input_without_a_default_is_refused_by_name(ctx):
    class TwoInputs(nn.Module):
        def forward(self, x, mask):
            return x * mask

    with pytest.raises(TypeError, match=r"takes 2 inputs \(x, mask\)"):
        trace(TwoInputs(), ctx)


def test_iterating_a_split_gives_its_pieces_and_runs_on_integers(tmp_path):
    torch.manual_seed(0)
    qmodel, x = _quantized(IteratedSplit(), tmp_path)
    assert count_ops(qmodel, x).float == 0


def test_a_branch_on_cached_sizes_and_a_grid_from_sizes_are_computed_once(tmp_path):
    torch.manual_seed(0)
    model = CachedGrid()
    with torch.no_grad():
        model.eval()(torch.zeros(5, 3, 8, 8))  # the user ran it: a shape is cached, the branch reads it
    qmodel, x = _quantized(model, tmp_path)
    kinds = {n.target for n in qmodel.graph.nodes if n.op in ("call_function", "call_method")}
    assert not kinds & {torch.meshgrid, torch.arange, "type_as", "new_full"}  # folded into a constant
    with pytest.raises(ValueError, match="shape"):
        qmodel(torch.zeros(2, 3, 16, 16))  # made for the calibration size, and says so


def test_a_branch_the_batch_size_decides_is_not_specialized(ctx):
    class ByBatch(nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] > 1 else x

    with pytest.raises(TypeError, match="cannot trace ByBatch"):
        trace(ByBatch(), fxq.PassContext(fxq.QConfig(), [torch.randn(4, 3, 8, 8)]))


class WindowPadding(nn.Module):
    """Swin: pad up to a multiple of the window, computed from the sizes; shift the windows by a roll."""

    def __init__(self):
        super().__init__()
        self.conv, self.window = nn.Conv2d(3, 4, 3, padding=1), 3

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        _, h, w, _ = y.shape
        pad_h, pad_w = (self.window - h % self.window) % self.window, (self.window - w % self.window) % self.window
        y = torch.nn.functional.pad(y, (0, 0, 0, pad_w, 0, pad_h))
        return torch.roll(y, shifts=(-1, -1), dims=(1, 2))[:, :h, :w, :].permute(0, 3, 1, 2)


class BufferOverBatch(nn.Module):
    """ConViT: a buffer expanded to a batch size the tracer holds as a proxy, then projected."""

    def __init__(self):
        super().__init__()
        self.conv, self.proj = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(3, 4)
        self.register_buffer("positions", torch.linspace(-1, 1, 3 * 64).reshape(1, 64, 3), persistent=False)

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        positions = self.proj(self.positions.expand(b, -1, -1))
        return y.flatten(2).transpose(1, 2) * positions


def test_padding_computed_from_sizes_is_fixed_for_the_calibration_size_and_rolls_export(tmp_path):
    torch.manual_seed(0)
    qmodel, x = _quantized(WindowPadding(), tmp_path)
    (pad,) = [n for n in qmodel.graph.nodes if n.op == "call_module" and "pad" in n.target]
    assert qmodel.get_submodule(pad.target).pads == (0, 0, 0, 1, 0, 1)  # 8 → 9, a multiple of 3


def test_a_buffer_expanded_to_a_traced_batch_size_is_recorded_and_runs_on_integers(tmp_path):
    torch.manual_seed(0)
    _quantized(BufferOverBatch(), tmp_path)  # every op on integers, twin, load and deploy exact


class Keypoints(nn.Module):
    """Ultralytics' keypoint decoding: slices of a clone assigned in place, one reading another's result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 9, 3, padding=1)
        self.register_buffer("grid", torch.linspace(0, 1, 64))

    def forward(self, x):
        y = self.conv(x).flatten(2).clone()
        y[:, 2::3] = y[:, 2::3].sigmoid()
        y[:, 0::3] = (y[:, 0::3] * 2.0 + (self.grid - 0.5)) * 8
        return y


def test_slice_assignments_become_values_and_run_on_integers(tmp_path):
    from fxq.ops.assign import QAssign
    torch.manual_seed(0)
    model = Keypoints().eval()
    qmodel, x = _quantized(model, tmp_path)
    assert len([m for m in qmodel.modules() if isinstance(m, QAssign)]) == 2
    with torch.no_grad():
        y = model(x)
    assert torch.equal(y[:, 1::3], model.conv(x).flatten(2)[:, 1::3])  # the user's model still assigns in place


def test_an_assignment_into_a_view_is_left_to_the_view(ctx):
    import operator

    class IntoView(nn.Module):
        def forward(self, x):
            view = x.view(x.shape[0], -1)
            view[:, :2] = 0.0
            return x * 2

    gm = trace(IntoView(), fxq.PassContext(fxq.QConfig(), [torch.randn(4, 3, 8, 8)]))
    assert any(n.target is operator.setitem for n in gm.graph.nodes)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x.clone()), IntoView()(x.clone()))


class DtypeReads(nn.Module):
    """EVA's rotary embedding casts by another tensor's dtype: ``sin.to(q.dtype)``."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        return self.head(torch.sigmoid(h).to(h.dtype) * h)


def test_a_cast_to_another_tensors_dtype_names_the_dtype_and_deploys(tmp_path):
    torch.manual_seed(0)
    qmodel, _ = _quantized(DtypeReads(), tmp_path)
    assert not any(n.target is getattr for n in qmodel.graph.nodes)


def window_scores(x):
    """A library's helper it marks for torch.fx to keep whole (torchvision's Swin attention)."""
    return torch.softmax(x.flatten(2), -1).reshape(x.shape) * x


torch.fx.wrap("window_scores")


class WrappedHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(window_scores(self.conv(x)))


def test_a_function_another_package_wraps_is_traced_through_and_saves(tmp_path):
    torch.manual_seed(0)
    qmodel, _ = _quantized(WrappedHelper(), tmp_path)
    assert not any(n.target is window_scores for n in qmodel.graph.nodes)
