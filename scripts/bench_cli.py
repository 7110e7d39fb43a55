"""Benchmark: how long the command's analyses take on a user's own small model, as a user runs them.

    python -m scripts.bench_cli

The kind of project issue 30 measured: a 5-class RGB image folder (here Fashion-MNIST's first five
classes at 32×32, 500 training and 500 test images per class) and the user's own CNN — residual adds,
depthwise conv, concat, SiLU, Hardswish, global pool, linear head, 14 conv/linear layers — trained
here for a few epochs. Times ``fxq --help``, ``fxq search-bits --avg-bits 5`` (default candidate
widths, 500 calibration images) and ``fxq report`` (defaults), each a fresh process; writes
``results/bench_cli.json`` and the README's block naming the CPU. Goals: --help well under a second, search-bits
≤ 60 s, report ≤ 45 s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from scripts import data, readme

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat")
PER_CLASS = {"train": 500, "test": 500}


def _unit(cin: int, cout: int, act: nn.Module, stride: int = 1, groups: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = _unit(c, c, nn.SiLU()), _unit(c, c, nn.Identity())

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + x)


class _Branches(nn.Module):
    def __init__(self, cin: int, half: int):
        super().__init__()
        self.narrow, self.wide = _unit(cin, half, nn.ReLU(), k=1), _unit(cin, half, nn.ReLU())

    def forward(self, x):
        return torch.cat([self.narrow(x), self.wide(x)], 1)


def user_net() -> nn.Module:
    """The user's CNN: 14 conv/linear layers at 32×32 RGB, 5 classes."""
    return nn.Sequential(
        _unit(3, 16, nn.SiLU()), _Residual(16),
        _unit(16, 16, nn.Hardswish(), stride=2, groups=16), _unit(16, 32, nn.Hardswish(), k=1),
        _Branches(32, 16), _Residual(32),
        _unit(32, 64, nn.SiLU(), stride=2), _unit(64, 64, nn.Hardswish(), groups=64), _unit(64, 64, nn.SiLU(), k=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))


def _write_folder(root: Path) -> None:
    from PIL import Image
    for split, count in PER_CLASS.items():
        images = data.load("fashion", split)
        mean, std = data.NORMALIZATION["fashion"]
        pixels = ((images.images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, index in enumerate((images.labels == label).nonzero()[:count, 0].tolist()):
                gray = Image.fromarray(pixels[index].numpy()).resize((32, 32))
                Image.merge("RGB", (gray, gray, gray)).save(folder / f"{i}.png")


def _train(root: Path, weights: Path) -> None:
    """A few epochs on the folder's training images, as the user's own recipe would."""
    from fxq.cli.inputs import load_data
    torch.manual_seed(0)
    model = user_net()
    loaded = load_data(str(root), 3)
    batches = list(loaded.calibration(PER_CLASS["train"] * len(CLASSES), shard=False))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(6):
        for images, labels in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    torch.save(model.eval().state_dict(), weights)


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    fxq_command = [sys.executable, "-m", "fxq.cli.main"]
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder)
        _write_folder(project / "images")
        _train(project / "images", project / "user.pt")
        model = ["--model", "scripts.bench_cli:user_net", "--weights", "user.pt", "--data", "images"]
        rows = {"fxq --help": _timed(fxq_command + ["--help"], project)[0]}
        rows["fxq search-bits --avg-bits 5 --calib 500"] = _timed(
            fxq_command + ["search-bits", *model, "--avg-bits", "5", "--calib", "500", "--quiet",
                           "--out-config", "bits.toml"], project)[0]
        _timed(fxq_command + ["quantize", *model, "--calib", "500", "--out", "user.fxq", "--quiet"], project)
        seconds, _ = _timed(fxq_command + ["report", "user.fxq", *model, "--out", "report", "--quiet"], project)
        rows["fxq report (defaults)"] = seconds
        _, table = _timed(fxq_command + ["evaluate", "user.fxq", *model, "--quiet", "--runs", "3"], project)
    machine = readme.machine(torch.get_num_threads())
    result = {**machine, "seconds": rows, "evaluate": table}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_cli.json").write_text(json.dumps(result, indent=2))
    lines = tabulate([(k, f"{v:.1f}") for k, v in rows.items()], headers=["command", "seconds"], tablefmt="github")
    readme.publish("bench-cli", f"{machine['cpu']} ({machine['capability']}), {machine['threads']} threads, "
                                f"torch {machine['torch']}; each command a fresh process:\n\n{lines}\n\n"
                                f"`fxq evaluate` of the quantized model:\n\n```\n{table.rstrip()}\n```")


if __name__ == "__main__":
    main()
