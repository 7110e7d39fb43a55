"""fxq.integers.patches: a layer as a matrix product over rows gives the layer's own outputs."""
import pytest
import torch
from torch import nn

from fxq.integers import patches

LAYERS = {
    "conv": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "strided, dilated, rectangular": lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 3), dilation=(1, 2)),
    "same": lambda: nn.Conv2d(4, 6, 4, padding="same", bias=False),
    "valid": lambda: nn.Conv2d(4, 6, 3, padding="valid"),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "grouped, two outputs per group": lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=2, stride=2),
    "linear on tokens": lambda: nn.Linear(4, 6),
}


def _input(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = {nn.Linear: (5, 7, 4), nn.Conv1d: (5, 4, 11)}.get(type(layer), (5, 4, 9, 10))
    return torch.randn(shape, generator=g)


def _per_position(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as (images · positions, channels), in the rows' order."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("kind", LAYERS)
def test_every_position_as_rows_gives_the_layers_output(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = _input(layer)
    (rows,) = patches.sampled_rows(layer, (x,), torch.Generator().manual_seed(0), chunk=2)
    out = patches.apply(layer, rows, layer.weight)
    with torch.no_grad():
        expected = _per_position(layer, layer(x))
    assert out.shape[:2] == expected.shape and all(size == 1 for size in out.shape[2:])
    assert torch.allclose(out.reshape(expected.shape), expected, atol=1e-5)


def test_sampled_rows_are_the_same_positions_of_every_input_and_fit_the_budget(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, padding=1)
    x = _input(layer)
    monkeypatch.setattr(patches, "ROW_FLOATS", 5 * 36 * 7)  # 7 of each image's 90 positions
    rows, doubled = patches.sampled_rows(layer, (x, 2 * x), torch.Generator().manual_seed(0), chunk=2)
    assert rows.shape == (5 * 7, 36) and torch.equal(doubled, 2 * rows)
    with torch.no_grad():
        every = _per_position(layer, layer(x)).reshape(5, 90, 6)
    out = patches.apply(layer, rows, layer.weight).reshape(5, 7, 6)
    for image in range(5):  # each row is one of that image's own outputs, none twice
        matches = (out[image, :, None, :] - every[image, None]).abs().amax(-1) < 1e-5
        assert torch.all(matches.sum(1) == 1) and matches.any(0).sum() == 7
