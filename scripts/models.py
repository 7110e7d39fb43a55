"""The float network fxq is measured on, and its committed checkpoints."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchvision
from torch import nn

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


def resnet18_28x28() -> nn.Module:
    """torchvision ResNet-18 for 1×28×28 images: a 3×3 stride-2 stem and no max-pool, 10 classes."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=2, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def checkpoint_path(dataset: str) -> Path:
    return CHECKPOINTS / f"resnet18_{dataset}.pt"


def load_trained(dataset: str) -> nn.Module:
    """The committed float ResNet-18 for ``dataset`` (an fp16 state dict, loaded as float32)."""
    path = checkpoint_path(dataset)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m scripts.train {dataset}`")
    model = resnet18_28x28()
    state = torch.load(path, map_location="cpu")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
