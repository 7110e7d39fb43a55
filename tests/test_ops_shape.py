"""Data movement on integers: a model's own tensors moved over the batch (class tokens) and
slices whose bounds the model computes from sizes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxq.ops.shape import QConstant
from tests.helpers import images, quantize_whole


class ClassToken(nn.Module):
    """ViT/DeiT/PiT: a learned token expanded over the batch, joined to the patch tokens, and
    split off again at the length the token had (``x[:, :token_length]``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8) * 3)
        self.mix = nn.Linear(8, 8)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.mix(torch.cat((cls, tokens), dim=1))
        length = cls.shape[1]
        return x[:, :length].flatten(1) + x[:, length:].mean(1)


def test_a_class_token_expanded_over_the_batch_is_quantized_once_and_joined_on_integers(tmp_path):
    torch.manual_seed(0)
    calibration, x = images(16)
    qmodel = quantize_whole(ClassToken().eval(), calibration, x, tmp_path)
    (constant,) = [m for m in qmodel.modules() if isinstance(m, QConstant)]
    cat = next(n for n in qmodel.graph.nodes if n.op == "call_module" and "cat" in n.target)
    assert qmodel.get_submodule(cat.target).identity[0]  # at the join's own parameters: joined as it is
    assert constant.values.shape == (1, 1, 8)  # one token, not one per sample


def test_a_constant_moved_elsewhere_takes_its_own_range(tmp_path):
    class Tiled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.queries = nn.Parameter(torch.linspace(-2, 5, 12).reshape(1, 3, 4))

        def forward(self, x):  # learned queries over the batch, read by a product of activations
            return torch.matmul(self.queries.expand(x.shape[0], -1, -1), self.conv(x).flatten(2))

    torch.manual_seed(0)
    calibration, x = images(8)
    qmodel = quantize_whole(Tiled().eval(), calibration, x, tmp_path)
    (constant,) = [m for m in qmodel.modules() if isinstance(m, QConstant)]
    assert constant.values.min() == 0 and constant.values.max() == 255  # −2 and 5, the ends of its range


class Moves(nn.Module):
    """ESPCN's sub-pixel upsampling, ShuffleNet's channel shuffle, LeViT's reshape_as, Unflatten."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv, self.up = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.shuffle, self.unshuffle = nn.PixelShuffle(2), nn.PixelUnshuffle(2)
        self.channels, self.unflatten = nn.ChannelShuffle(4), nn.Unflatten(1, (4, 8))

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.functional:
            z = self.up(F.pixel_shuffle(F.channel_shuffle(y, 4), 2))
            return F.pixel_unshuffle(z, 2).unflatten(1, (4, 8)).reshape_as(z.unsqueeze(1))
        z = self.up(self.shuffle(self.channels(y)))
        moved = self.unshuffle(z)
        return self.unflatten(moved.flatten(2).view_as(moved))


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functions"])
def test_pixel_and_channel_shuffles_move_integers_and_deploy_bit_exact(functional, tmp_path):
    torch.manual_seed(0)
    calibration, x = images(8)
    quantize_whole(Moves(functional).eval(), calibration, x, tmp_path)
