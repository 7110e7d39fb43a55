"""Train a float network fxq quantizes, seeded, and save it as an fp16 state dict.

    python -m scripts.train mnist                  # the recipe of scripts.models.SUITE["mnist"]
    python -m scripts.train fashion_stem5          # another member of the model suite
    python -m scripts.train fashion_mobilenet_v2   # a network of scripts.models.BRANCHED

Writes the checkpoint (``checkpoints/resnet18_<name>.pt`` for the ResNets, ``<name>.pt`` for
the others) and a ``.json`` beside it (the command, the recipe, the float test accuracy of the
saved fp16 weights and the file's sha256).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F

from fxq.analysis import measure
from scripts import data, models


def augment(images: torch.Tensor, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random 28×28 crop of the image padded by 2 (and a horizontal flip for clothes)."""
    n = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2), value=float(images.min()))
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
    out = padded[:, :, dy:dy + 28, dx:dx + 28]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out.contiguous()


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: data.Split, batch_size: int = 500) -> float:
    return measure.accuracy(model, zip(split.images.split(batch_size), split.labels.split(batch_size)))


def train(recipe: models.Recipe, batch_size: int) -> torch.nn.Module:
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    train_split = data.load(recipe.dataset, "train")
    model = models.build(recipe)
    steps = recipe.epochs * (len(train_split) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps)
    step, start = 0, time.time()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(train_split), generator=generator)
        for index in order.split(batch_size):
            if len(index) < batch_size:
                continue
            images = train_split.images[index]
            if recipe.augment:
                images = augment(images, flip=recipe.dataset == "fashion", generator=generator)
            loss = F.cross_entropy(model(images), train_split.labels[index],
                                   label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} "
                      f"{time.time() - start:.0f}s", flush=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(models.RECIPES))
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    recipe = models.RECIPES[args.name]
    torch.set_num_threads(2)
    start = time.time()
    model = train(recipe, args.batch_size)
    minutes = (time.time() - start) / 60
    path = models.checkpoint_path(args.name)
    path.parent.mkdir(exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               path)
    test_acc = accuracy(models.load_trained(args.name), data.load(recipe.dataset, "test"))
    record = {
        "command": "python -m scripts.train " + " ".join(sys.argv[1:]),
        **dataclasses.asdict(recipe), "batch_size": args.batch_size,
        "train_minutes": round(minutes, 1),
        "float_test_accuracy": test_acc, "sha256": models.sha256(path),
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
