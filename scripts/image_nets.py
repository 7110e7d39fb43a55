"""Image-to-image networks as people write them, for the vision zoo (`scripts.zoo_vision`): a UNet
(conv blocks, max-pool down, transposed-conv up, skip concatenations) and ESPCN (super-resolution
by sub-pixel convolution: the last conv's channels become pixels through ``nn.PixelShuffle``)."""
from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))


class UNet(nn.Module):
    """Ronneberger et al.'s shape at a small width: ``depth`` levels, per-pixel class scores."""

    def __init__(self, channels: int = 3, classes: int = 4, width: int = 16, depth: int = 3):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(channels, widths[0])] + [_block(a, b) for a, b in zip(widths, widths[1:])])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:])][::-1])
        self.merge = nn.ModuleList([_block(2 * a, a) for a in widths[:-1]][::-1])
        self.head = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


class ESPCN(nn.Module):
    """Shi et al.'s efficient sub-pixel network: ×``scale`` super-resolution of ``channels`` planes."""

    def __init__(self, channels: int = 3, scale: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 64, 5, padding=2), nn.Tanh(),
                                      nn.Conv2d(64, 32, 3, padding=1), nn.Tanh())
        self.sub_pixel = nn.Sequential(nn.Conv2d(32, channels * scale ** 2, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x):
        return self.sub_pixel(self.features(x))
