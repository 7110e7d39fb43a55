import pytest
import torch
from torch import nn

import fxq
from fxq.graphs import records
from fxq.integers.observers import MinMaxObserver
from passes.calibrate import calibrate
from passes.insert_observers import insert_observers
from passes.trace import trace


def observed_graph(ctx):
    return insert_observers(trace(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()), ctx), ctx)


def input_observer(gm):
    placeholder = next(iter(gm.graph.nodes))
    return gm.get_submodule(f"observers.{placeholder.name}")


def test_every_batch_reaches_the_observers_and_the_graph_is_unchanged(ctx):
    gm = observed_graph(ctx)
    code = gm.code
    gm = calibrate(gm, ctx)
    assert gm.code == code
    obs = input_observer(gm)
    assert isinstance(obs, MinMaxObserver)
    everything = torch.cat(ctx.calib_loader)
    assert obs.min_val.item() == everything.min().item()
    assert obs.max_val.item() == everything.max().item()
    record = records.get(next(iter(gm.graph.nodes)), records.Calibration)
    assert (record.batches, record.samples, record.sample_shape) == (3, 12, (3, 8, 8))


def test_image_label_tuples_and_dataloaders_are_accepted(ctx):
    images = torch.randn(10, 3, 8, 8)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(10, dtype=torch.long))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    gm = calibrate(observed_graph(ctx), fxq.PassContext(fxq.QConfig(), loader))
    assert input_observer(gm).max_val.item() == images.max().item()


@pytest.mark.parametrize("loader, error, pattern", [
    ([], ValueError, "no batches"),
    ([torch.tensor([[[[float("nan")]]]]).expand(1, 3, 2, 2)], ValueError, "batch 0 contains NaN"),
    ([torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), float("inf"))], ValueError, "batch 1 contains NaN or Inf"),
    ([torch.ones(2, 5, 8, 8)], ValueError,
     r"batch 0 of shape \(2, 5, 8, 8\) cannot run through the model at '0' \(%_0 : .*call_module\[target=0\]"),
    ([torch.ones(3, 8, 8, dtype=torch.long)], TypeError, "int64 tensor"),
    (["not a tensor"], TypeError, "batch 0 is str"),
    ([torch.ones(8)], ValueError, "batch dimension"),
])
def test_bad_calibration_data_is_named(ctx, loader, error, pattern):
    with pytest.raises(error, match=pattern):
        calibrate(observed_graph(ctx), fxq.PassContext(fxq.QConfig(), loader))


class Viewing(nn.Module):
    """Flattens its activations with ``view``, which a channels-last tensor cannot do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=8)

    def forward(self, x):
        y = self.conv(x)
        return y.view(y.shape[0], -1)


@pytest.mark.parametrize("model", [Viewing, lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())])
def test_large_images_calibrate_channels_last_only_where_the_model_allows_and_ranges_agree(model):
    torch.manual_seed(0)
    net = model().eval()
    images = [torch.randn(4, 3, 100, 100) for _ in range(3)]  # beyond CHANNELS_LAST_PIXELS
    context = fxq.PassContext(fxq.QConfig(), images)
    gm = calibrate(insert_observers(trace(net, context), context), context)
    assert all(p.is_contiguous() for p in gm.parameters())  # the layout is the calibration's own
    with torch.no_grad():
        outputs = torch.cat([net(x).flatten(1) for x in images])
    inner = [m for m in gm.modules() if isinstance(m, MinMaxObserver) and m is not input_observer(gm)]
    # the observed conv range is the float model's own (up to the conv's float rounding)
    assert max(m.max_val.item() for m in inner) == pytest.approx(outputs.max().item(), rel=1e-5)
