"""What the command's arguments name: a float model, its weights, the data, the QConfig."""
from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib
import torch
from torch import nn

from fxq import distributed
from fxq.analysis import datasets
from fxq.analysis.progress import Batches
from fxq.cli.usage import UsageError
from fxq.config import QConfig

FACTORY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
BUILTIN_DATA = {"mnist": "mnist", "fashion-mnist": "fashion", "fashion": "fashion"}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CONFIG_FIELDS = tuple(f.name for f in fields(QConfig) if f.init)


# --- the float model ---------------------------------------------------------------------

def build_model(spec: str, weights: Path | None, num_classes: int | None = None) -> nn.Module:
    """The float model named by ``spec`` (a torchvision classification model, or
    ``PKG.MODULE:FACTORY``, a callable returning the ``nn.Module``), with ``weights`` loaded."""
    if is_factory(spec):
        model = _from_factory(spec)
    else:
        model = _torchvision(spec, num_classes, _state(weights) if weights else None)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def is_factory(spec: str) -> bool:
    """``PKG.MODULE:FACTORY`` (the user's own code, which may load its weights) rather than a
    torchvision name (random weights unless ``--weights``)."""
    return ":" in spec


def _from_factory(spec: str) -> nn.Module:
    if not FACTORY.match(spec):
        raise UsageError(f"--model {spec!r} is not PKG.MODULE:FACTORY (e.g. mynets.small:build)")
    module_name, attribute = spec.split(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the user's own files, as `python -m` finds them
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r} ({error}); run fxq from the "
                         "folder that holds it, or add that folder to PYTHONPATH") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"--model {spec!r}: {module_name} has no {attribute!r}")
        target = getattr(target, part)
    model = target() if callable(target) else target
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision(name: str, num_classes: int | None, state: dict | None) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UsageError(f"--model {name!r} is not a torchvision classification model ({', '.join(known[:6])}, "
                         "...) nor PKG.MODULE:FACTORY")
    model = torchvision.models.get_model(name, **({} if num_classes is None else {"num_classes": num_classes}))
    if num_classes is None and state is not None:  # the checkpoint's classifier says how many classes
        head = [n for n, m in model.named_modules() if getattr(m, "weight", None) is not None
                and m.weight.dim() == 2][-1]  # the last fully connected layer
        rows = state.get(f"{head}.weight")
        if rows is not None and rows.dim() == 2 and rows.shape[0] != model.get_submodule(head).weight.shape[0]:
            model = torchvision.models.get_model(name, num_classes=rows.shape[0])
    return model


def _state(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file")
    try:  # weights_only: a checkpoint is tensors, never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--weights {path} is not a PyTorch state dict ({type(error).__name__}); save one "
                         "with torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--weights {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Load the state dict at ``path`` (fp16 checkpoints become the model's dtypes)."""
    state = _state(path)
    own = model.state_dict()
    mismatched = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        problems = (mismatched and f"shapes differ: {mismatched[:3]}") or \
                   (missing and f"missing {missing[:3]}") or f"unexpected {unexpected[:3]}"
        raise UsageError(f"--weights {path} does not fit the model ({problems}); give the architecture "
                         "it was trained as (--model, --num-classes)")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def input_channels(model: nn.Module) -> int:
    """Channels the model's first conv expects (3 if it has none)."""
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 4:
            return weight.shape[1] * getattr(m, "groups", 1)
    return 3


# --- the data ----------------------------------------------------------------------------

@dataclass
class Data:
    """A data set as the command reads it: calibration batches and labelled evaluation batches."""

    name: str
    calibration_split: object
    evaluation_split: object
    batch_size: int = 64
    note: str | None = None  # how the layout was read, where the user should know (the same images do both)

    def calibration(self, count: int, shard: bool = True) -> Batches:
        """``count`` images drawn with seed 0; under torchrun, this rank's share of the batches
        (``shard``), so that the ranks together calibrate on the same images one process would."""
        count = min(count, len(self.calibration_split))
        if count < 1:
            raise UsageError(f"--calib {count}: calibrate on at least one image")
        return _batches(self._sample(self.calibration_split, count), shard, "calibration images")

    def evaluation(self, limit: int | None = None, desc: str = "evaluating", shard: bool = True) -> Batches:
        """The first ``limit`` test images (default all); under torchrun, this rank's share."""
        count = len(self.evaluation_split) if limit is None else min(limit, len(self.evaluation_split))
        return _batches(self._first(self.evaluation_split, count), shard, desc)

    def labels(self, limit: int | None = None) -> torch.Tensor:
        """The first ``limit`` test labels (default all), read without the images."""
        split = self.evaluation_split
        count = len(split) if limit is None else min(limit, len(split))
        if isinstance(split, datasets.Split):
            return split.labels[:count]
        return torch.tensor(split.targets[:count], dtype=torch.int64)

    def class_names(self) -> list[str]:
        """The classes a label can name: an image folder's class folders (train/'s where there
        are splits), or a built-in set's class numbers."""
        split = self.evaluation_split
        if isinstance(split, datasets.Split):
            return [str(c) for c in range(int(split.labels.max()) + 1)]
        return list(split.classes)

    def example(self, count: int = 1) -> torch.Tensor:
        return next(iter(self._first(self.evaluation_split, count)))[0]

    def tensors(self, limit: int, shard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``limit`` test images and labels (this rank's share with ``shard``)."""
        batches = self.evaluation(limit, shard=shard).batches
        if not batches:
            return self.example(1)[:0], torch.zeros(0, dtype=torch.int64)
        images, labels = zip(*batches)
        return torch.cat(images), torch.cat(labels)

    def _sample(self, split, count: int) -> list:
        if isinstance(split, datasets.Split):
            return datasets.sample(split, count, self.batch_size)
        index = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:count]
        return self._loaded(torch.utils.data.Subset(split, index.tolist()))

    def _first(self, split, count: int) -> list:
        count = min(count, len(split))
        if isinstance(split, datasets.Split):
            return list(zip(split.images[:count].split(self.batch_size), split.labels[:count].split(self.batch_size)))
        return self._loaded(torch.utils.data.Subset(split, range(count)))

    def _loaded(self, subset) -> list:
        try:
            return list(torch.utils.data.DataLoader(subset, batch_size=self.batch_size))
        except RuntimeError as error:
            if "stack expects each tensor to be equal size" not in str(error):
                raise
            raise UsageError(f"the images of {self.name} differ in size; give --image-size H or HxW to "
                             "resize them all") from None


SPLITS = ("train", "test", "val", "validation")  # folder names that hold splits, never a class


def load_data(spec: str, channels: int, image_size=None, mean=None, std=None, batch_size: int = 64) -> Data:
    """``mnist``, ``fashion-mnist`` (training images calibrate, test images evaluate) or an image
    folder: ``DIR/train`` and ``DIR/test`` (or ``val``) of class folders, or ``DIR/<class>/*``.
    A folder with one split alone (``DIR/train`` without a test split, or the reverse) or with
    class folders alone gives its images to both calibration and evaluation, and says so in
    ``Data.note``; split folders beside class folders are refused (which would be a class?)."""
    if spec in BUILTIN_DATA:
        name = BUILTIN_DATA[spec]
        return Data(spec, datasets.load(name, "train"), datasets.load(name, "test"), batch_size)
    root = Path(spec)
    if not root.is_dir():
        raise UsageError(f"--data {spec!r} is neither mnist, fashion-mnist nor an existing folder")
    if mean is None:
        mean, std = IMAGENET if channels == 3 else ((0.0,) * channels, (1.0,) * channels)

    def folder(path: Path):
        try:
            return datasets.image_folder(path, channels, image_size, mean, std)
        except FileNotFoundError as error:  # no class folders, or no images in them
            raise UsageError(f"--data {spec}: {error}") from None

    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        images = folder(root)
        return Data(spec, images, images, batch_size, note=f"{spec} has no train/ and test/ folders: its images "
                    "both calibrate and evaluate, so the accuracy is measured on the calibration images")
    classes = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and p.name not in SPLITS and not p.name.startswith("."))
    if classes:
        raise UsageError(f"--data {spec}: split folders ({', '.join(s + '/' for s in splits)}) beside class "
                         f"folders ({', '.join(c + '/' for c in classes[:3])}...): put the class folders inside "
                         "train/ and test/")
    test = next((s for s in splits if s != "train"), None)
    if "train" in splits and test is not None:
        train = folder(root / "train")
        return Data(spec, train, same_classes(folder(root / test), train, spec, test), batch_size)
    only = splits[0]
    images = folder(root / only)
    missing = "a test/ (or val/) folder" if only == "train" else "a train/ folder"
    return Data(spec, images, images, batch_size, note=f"{spec} has {only}/ but not {missing}: the {only}/ images "
                "both calibrate and evaluate, so the accuracy is measured on the calibration images")


def same_classes(test, train, spec: str, name: str):
    """``test`` labelled with ``train``'s class indices (ImageFolder numbers each folder's own
    sorted classes: a test split without one class would shift every label after it)."""
    extra = sorted(set(test.classes) - set(train.classes))
    if extra:
        raise UsageError(f"--data {spec}: {name}/ has classes train/ has not ({', '.join(extra[:5])}): the model "
                         "was calibrated for train/'s classes; give both splits the same class folders")
    index = [train.class_to_idx[c] for c in test.classes]
    test.samples = test.imgs = [(path, index[label]) for path, label in test.samples]
    test.targets = [label for _, label in test.samples]
    test.classes, test.class_to_idx = train.classes, train.class_to_idx
    return test


def _batches(batches: list, shard: bool, desc: str) -> Batches:
    if shard and distributed.active():
        batches = distributed.mine(batches)
    return Batches(batches, sum(len(b[0]) for b in batches), desc)


# --- the QConfig -------------------------------------------------------------------------

def read_config(path: Path) -> tuple[dict, dict]:
    """QConfig fields and per-layer overrides from a TOML file:

        act_range = "percentile"
        [overrides]
        "layer4.*" = { weight_bits = 4 }
        fc = "float"
    """
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path} is not valid TOML: {error}") from None
    overrides = table.pop("overrides", {})
    _check_fields(table, f"--config {path}")
    if not isinstance(overrides, dict):
        raise UsageError(f"--config {path}: [overrides] must be a table of layer glob = {{ fields }} or \"float\"")
    for glob, value in overrides.items():
        if value != "float":
            if not isinstance(value, dict):
                raise UsageError(f"--config {path}: override {glob!r} must be a table of QConfig fields or \"float\"")
            _check_fields(value, f"--config {path}, override {glob!r}")
    return table, overrides


def _check_fields(table: dict, where: str) -> None:
    unknown = sorted(set(table) - set(CONFIG_FIELDS))
    if unknown:
        raise UsageError(f"{where}: unknown QConfig field(s) {unknown}; the fields are {list(CONFIG_FIELDS)}")


def make_config(values: dict, overrides: dict) -> tuple[QConfig, dict]:
    """The QConfig and fxq.quantize's ``overrides`` (glob → QConfig, or None for float). A value
    QConfig refuses is a usage error, from a flag or from ``--config`` alike."""
    try:
        config = QConfig(**values)
        return config, {glob: None if v == "float" else config.replace(**v) for glob, v in overrides.items()}
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def write_config(path: Path, config: QConfig, overrides: dict) -> None:
    """``config``'s explicitly chosen fields and ``overrides`` as TOML that :func:`read_config`
    reads back (fields left to the width defaults stay out, so they keep following the widths)."""
    chosen = {name: getattr(config, name) for name in CONFIG_FIELDS if name not in config._auto}
    lines = [f"{k} = {_toml(v)}" for k, v in chosen.items()] + ["", "[overrides]"]
    for glob, layer in overrides.items():
        if layer is None:
            lines.append(f"{_toml(glob)} = \"float\"")
        else:
            changed = {n: getattr(layer, n) for n in CONFIG_FIELDS
                       if n not in layer._auto and getattr(layer, n) != chosen.get(n)}
            lines.append(f"{_toml(glob)} = {{ {', '.join(f'{k} = {_toml(v)}' for k, v in changed.items())} }}")
    path.write_text("\n".join(lines) + "\n")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
