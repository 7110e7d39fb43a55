"""The float networks fxq is measured on, and their committed checkpoints.

``SUITE`` is the set of differently trained ResNet-18s that defaults are chosen on: two data
sets, several seeds, stems, augmentation settings and training lengths. Each entry says how to
build the network and how it was trained (``python -m scripts.train NAME`` retrains it).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
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


SUITE: dict[str, Recipe] = {
    "mnist": Recipe("mnist", epochs=3),
    "fashion": Recipe("fashion", epochs=6),
    "fashion_seed1": Recipe("fashion", epochs=2, seed=1, augment=False, label_smoothing=0.0),
    "fashion_stem5": Recipe("fashion", epochs=2, seed=2, stem="5x5s2"),
    "fashion_pool": Recipe("fashion", epochs=2, seed=3, stem="3x3s1pool", lr=0.05),
}


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
    return CHECKPOINTS / f"resnet18_{name}.pt"


def load_trained(name: str) -> nn.Module:
    """The committed float ResNet-18 ``name`` of :data:`SUITE` (an fp16 state dict, as float32)."""
    path = checkpoint_path(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m scripts.train {name}`")
    model = resnet18_28x28(SUITE[name].stem)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
