"""fxq.integers.gram: a layer's input Gram matrix, from im2col rows or from a stride-1 conv's input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxq.integers.gram import GRAM_BLOCK, add_conv_gram, add_gram, same_conv_kernel
from fxq.integers.observers import InputGram


@pytest.mark.parametrize("size", [7, 2 * GRAM_BLOCK + 37])
def test_the_gram_matrix_from_its_upper_triangle_is_the_full_product(size):
    torch.manual_seed(0)
    columns = torch.randn(300, size)
    gram = torch.zeros(size, size, dtype=torch.float64)
    for part in columns.split(100):  # added batch by batch, as calibration does
        add_gram(gram, part)
    expected = columns.double().T @ columns.double()
    block = slice(0, GRAM_BLOCK)
    assert torch.equal(gram[GRAM_BLOCK:, block], gram[block, GRAM_BLOCK:].T)  # mirrored, not computed
    assert torch.allclose(gram, expected, rtol=1e-5, atol=1e-3)


def _geometry(k: int, stride: int = 1, dilation: int = 1, padding: int | None = None) -> dict:
    padding = k // 2 if padding is None else padding
    return dict(kernel_size=(k, k), dilation=(dilation, dilation), padding=(padding, padding), stride=(stride, stride))


@pytest.mark.parametrize("n, c, h, w, k", [(2, 3, 9, 11, 3), (3, 4, 12, 8, 5), (1, 2, 3, 3, 3), (2, 5, 5, 9, 5),
                                           (1, 1, 7, 4, 3)])
def test_a_same_convs_gram_from_its_input_is_the_im2col_one(n, c, h, w, k):
    """Every block, borders and corners included, and the column sums, batch by batch."""
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w).relu() + 0.1 * torch.randn(n, c, h, w)
    columns = F.unfold(x.double(), **_geometry(k)).permute(0, 2, 1).reshape(-1, c * k * k)
    gram, sums = torch.zeros(c * k * k, c * k * k, dtype=torch.float64), torch.zeros(c * k * k, dtype=torch.float64)
    for part in x.split(1):
        add_conv_gram(gram, sums, part, k)
    scale = columns.abs().max() ** 2 * len(columns)
    assert (gram - columns.T @ columns).abs().max() <= 1e-6 * scale
    assert (sums - columns.sum(0)).abs().max() <= 1e-6 * columns.abs().max() * len(columns)


@pytest.mark.parametrize("geometry, shape", [
    (_geometry(3, stride=2), (1, 2, 16, 16)), (_geometry(3, dilation=2), (1, 2, 16, 16)),
    (_geometry(1), (1, 2, 16, 16)),
    (_geometry(3, padding=0), (1, 2, 16, 16)), (dict(_geometry(3), kernel_size=(3, 5)), (1, 2, 16, 16)),
    (_geometry(4), (1, 2, 16, 16)), (_geometry(3), (1, 2, 11, 40)), (None, (1, 2, 16, 16))])
def test_other_convs_and_small_maps_take_the_im2col_columns(geometry, shape):
    assert same_conv_kernel(geometry, torch.Size(shape)) is None
    assert same_conv_kernel(_geometry(3), torch.Size((1, 2, 12, 12))) == 3


def test_an_input_gram_of_a_same_conv_records_what_its_im2col_columns_give():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    statistics = InputGram(conv, "x")
    x = torch.randn(4, 3, 12, 13)
    for part in x.split(2):
        assert torch.equal(statistics(part), part)
    columns = F.unfold(x.double(), **statistics.geometry).permute(0, 2, 1).reshape(-1, 27)
    assert statistics.count == len(columns)
    assert torch.allclose(statistics.gram_matrix, columns.T @ columns, rtol=1e-5, atol=1e-4)
    assert torch.allclose(statistics.mean, columns.mean(0), rtol=1e-5, atol=1e-6)
