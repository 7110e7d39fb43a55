"""The float networks fxq is measured on, and their committed checkpoints.

``SUITE`` is the set of differently trained ResNet-18s that defaults are chosen on: two data
sets, several seeds, stems, augmentation settings and training lengths. ``BRANCHED`` holds
networks of other shapes trained on Fashion-MNIST: MobileNetV2 (depthwise convs, ReLU6),
MobileNetV3-small (squeeze-and-excitation, Hardswish), EfficientNet-B0 (SiLU, squeeze-and-
excitation, stochastic depth while training) and an Inception-style net that joins its branches
with ``torch.cat``. Each entry says how to build the network and how it was trained
(``python -m scripts.train NAME`` retrains it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


@dataclass(frozen=True)
class Recipe:
    """One trained model of the suite: its data, network stem and training settings."""

    dataset: str
    epochs: int
    seed: int = 0
    stem: str = "3x3s2"        # "3x3s2": 3×3 stride-2 conv; "5x5s2"; "3x3s1pool": 3×3 conv, 2×2 max-pool
    augment: bool = True       # random crops (and flips for clothes)
    label_smoothing: float = 0.1
    lr: float = 0.1
    architecture: str = "resnet18"  # or "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "inception"


SUITE: dict[str, Recipe] = {
    "mnist": Recipe("mnist", epochs=3),
    "fashion": Recipe("fashion", epochs=6),
    "fashion_seed1": Recipe("fashion", epochs=2, seed=1, augment=False, label_smoothing=0.0),
    "fashion_stem5": Recipe("fashion", epochs=2, seed=2, stem="5x5s2"),
    "fashion_pool": Recipe("fashion", epochs=2, seed=3, stem="3x3s1pool", lr=0.05),
}


BRANCHED: dict[str, Recipe] = {
    "fashion_mobilenet_v2": Recipe("fashion", epochs=3, seed=4, lr=0.05, architecture="mobilenet_v2"),
    "fashion_mobilenet_v3": Recipe("fashion", epochs=3, seed=5, lr=0.05, architecture="mobilenet_v3_small"),
    "fashion_inception": Recipe("fashion", epochs=3, seed=6, lr=0.05, architecture="inception"),
    "fashion_efficientnet": Recipe("fashion", epochs=3, seed=7, lr=0.02, architecture="efficientnet_b0"),
}
RECIPES: dict[str, Recipe] = {**SUITE, **BRANCHED}


def build(recipe: Recipe) -> nn.Module:
    """The untrained network of ``recipe``, for 1×28×28 images and 10 classes."""
    if recipe.architecture == "resnet18":
        return resnet18_28x28(recipe.stem)
    if recipe.architecture == "inception":
        return Inception()
    model = torchvision.models.get_model(recipe.architecture, num_classes=10)
    stem = model.features[0][0]  # a stride-1 stem for 28×28 (the network still halves 4 times)
    model.features[0][0] = nn.Conv2d(1, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return model


class Branches(nn.Module):
    """An Inception block: 1×1, 3×3, two stacked 3×3 and pool → 1×1 branches, joined by torch.cat."""

    def __init__(self, cin: int, width: int):
        super().__init__()

        def unit(c_in, c_out, k):
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                                 nn.ReLU())

        self.one = unit(cin, width, 1)
        self.three = nn.Sequential(unit(cin, width, 1), unit(width, width, 3))
        self.five = nn.Sequential(unit(cin, width // 2, 1), unit(width // 2, width, 3), unit(width, width, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), unit(cin, width, 1))

    def forward(self, x):
        return torch.cat([self.one(x), self.three(x), self.five(x), self.pool(x)], 1)


class Inception(nn.Module):
    """A small Inception-style network for 28×28 images: stem, three branch blocks, pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block1, self.block2, self.block3 = Branches(32, 16), Branches(64, 32), Branches(128, 48)
        self.down = nn.MaxPool2d(2)
        self.fc = nn.Linear(192, 10)

    def forward(self, x):
        x = self.down(self.block1(self.stem(x)))
        x = self.down(self.block2(x))
        x = self.block3(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18_28x28(stem: str = "3x3s2") -> nn.Module:
    """torchvision ResNet-18 for 1×28×28 images, 10 classes, with a small-image stem (no 7×7
    conv): by default a 3×3 stride-2 conv and no max-pool."""
    model = torchvision.models.resnet18(num_classes=10)
    model.maxpool = nn.Identity()
    if stem == "3x3s2":
        model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=2, padding=1, bias=False)
    elif stem == "5x5s2":
        model.conv1 = nn.Conv2d(1, 64, kernel_size=5, stride=2, padding=2, bias=False)
    elif stem == "3x3s1pool":
        model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.MaxPool2d(2)
    else:
        raise ValueError(f"unknown stem {stem!r}: use 3x3s2, 5x5s2 or 3x3s1pool")
    return model


def checkpoint_path(name: str) -> Path:
    return CHECKPOINTS / (f"resnet18_{name}.pt" if RECIPES[name].architecture == "resnet18" else f"{name}.pt")


def load_trained(name: str) -> nn.Module:
    """The committed float network ``name`` of :data:`RECIPES` (an fp16 state dict, as float32)."""
    path = checkpoint_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m scripts.train {name}`")
    model = build(RECIPES[name])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
