"""fxq on torchvision's classification models: what quantizes, what runs on integers, how close.

    python -m scripts.zoo                      # every model: results/zoo.json + the README table
    python -m scripts.zoo --models resnet18 mobilenet_v2 --no-reference
    python -m scripts.zoo --joins               # concatenations: shared parameters vs requantizing

Each model has random weights with batch norm settled on the images (train-mode passes, so the
activations have realistic scales), 3×64×64 structured random images (smooth random fields plus
fine noise), 64 for calibration and 256 to score. Per model, fxq at the W8A8 defaults and, as a
reference only, torch.ao FX graph mode PTQ with the x86 default qconfig on the same data:
quantized or not, the share of executed ops on integer tensors (`fxq.runtime.count_ops`: the
dtypes each op actually saw), logits SQNR against float, top-1 agreement with float. For fxq
also: the integer graph against `fxq.simulate` (bit for bit) and save → load (identical outputs).
``--joins`` quantizes the models that concatenate twice more, each concatenation's inputs at its
own parameters (the default) and requantized to them, and writes that comparison's table.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import fxq
from fxq.comparison import sqnr_db
from fxq.runtime import count_ops
from passes.convert import convert, convert_requantizing_joins
from scripts import readme
from scripts.evaluate import torch_ao_x86
from scripts.results import Store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "zoo.json"
JOINING = ("densenet121", "squeezenet1_0", "shufflenet_v2_x0_5", "googlenet")
MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "vgg11_bn", "densenet121",
          "squeezenet1_0", "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_x_400mf", "googlenet", "convnext_tiny")
EXTRA_ARGUMENTS = {"googlenet": {"aux_logits": False, "init_weights": True}}
SIZE, CALIBRATION, SCORED = 64, 64, 256


def images(count: int, seed: int) -> torch.Tensor:
    """Smooth random fields (coarse noise upsampled) with a little fine noise: images with
    spatial structure, so convolutions see correlated neighbours as on photographs."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(count, 3, 8, 8, generator=g), size=SIZE, mode="bicubic", align_corners=False)
    return coarse + 0.25 * torch.randn(count, 3, SIZE, SIZE, generator=g)


def build(name: str, seed: int = 0) -> nn.Module:
    """The model with random weights and batch norm statistics settled on the images."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notes on initialization
        model = torchvision.models.get_model(name, weights=None, **EXTRA_ARGUMENTS.get(name, {}))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the settling batches
    model.train()
    with torch.no_grad():
        for index in range(4):
            model(images(32, 1000 + index))
    return model.eval()


@dataclass
class Result:
    quantized: bool
    integer_share: float | None = None   # % of executed ops (with tensors, not quantize/dequantize)
    sqnr_db: float | None = None
    top1_agreement: float | None = None  # % of the scored images with the float model's class
    seconds: float | None = None
    float_ops: list | None = None        # what ran in float, by node name
    twin_exact: bool | None = None
    save_load_identical: bool | None = None
    error: str | None = None


def score(model: nn.Module, qmodel: nn.Module, scored: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        reference, got = model(scored), qmodel(scored)
    return sqnr_db(reference, got), 100.0 * float((reference.argmax(1) == got.argmax(1)).float().mean())


def share(gm, example: torch.Tensor) -> tuple[float, list]:
    counts = count_ops(gm, example)
    return 100.0 * counts.integer / max(counts.integer + counts.float, 1), list(counts.float_ops)


def run_fxq(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor, passes=None) -> Result:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxq.FloatFallbackWarning)  # the report lists them
        qmodel = fxq.quantize(model, list(calibration.split(16)), passes=passes)
    seconds = time.perf_counter() - start
    sqnr, agreement = score(model, qmodel, scored)
    integer_share, float_ops = share(qmodel, scored[:8])
    twin = fxq.simulate(qmodel)
    with torch.no_grad():
        exact = bool(torch.equal(twin(scored), qmodel(scored)))
        with tempfile.TemporaryDirectory() as folder:
            fxq.save(qmodel, Path(folder) / "model.fxq")
            identical = bool(torch.equal(fxq.load(Path(folder) / "model.fxq")(scored), qmodel(scored)))
    return Result(True, integer_share, sqnr, agreement, seconds, float_ops, exact, identical)


def run_torch_ao(model: nn.Module, calibration: torch.Tensor, scored: torch.Tensor) -> Result:
    start = time.perf_counter()
    qmodel = torch_ao_x86(model, [(batch, None) for batch in calibration.split(16)])
    seconds = time.perf_counter() - start
    sqnr, agreement = score(model, qmodel, scored)
    integer_share, float_ops = share(qmodel, scored[:8])
    return Result(True, integer_share, sqnr, agreement, seconds, float_ops)


def attempt(run, *args) -> Result:
    try:
        return run(*args)
    except Exception as error:  # a model a quantizer cannot take is a result, not a crash
        line = traceback.format_exception_only(type(error), error)[-1].strip()
        return Result(False, error=line[:300])


def table(results: dict) -> str:
    rows = []
    for name, entry in results.items():
        ours, peer = Result(**entry["fxq"]), entry.get("torch.ao") and Result(**entry["torch.ao"])

        def cells(r: Result | None) -> list:
            if r is None:
                return ["—"] * 4
            if not r.quantized:
                return ["no", "", "", ""]
            return ["yes", f"{r.integer_share:.0f} %", f"{r.sqnr_db:.1f}", f"{r.top1_agreement:.1f} %"]

        checks = "" if not ours.quantized else ("✓" if ours.twin_exact and ours.save_load_identical else "✗")
        rows.append([name] + cells(ours) + [checks] + cells(peer))
    headers = ["model", "fxq", "integer ops", "SQNR dB", "top-1 agree", "twin & load exact",
               "torch.ao", "integer ops", "SQNR dB", "top-1 agree"]
    return tabulate(rows, headers=headers, tablefmt="github")


def joins_table(results: dict) -> str:
    rows = []
    for name in JOINING:
        entry = results.get(name, {})
        if "joins shared" in entry:
            shared, requantized = entry["joins shared"], entry["joins requantized"]
            rows.append([name, f"{shared['sqnr_db']:.2f}", f"{requantized['sqnr_db']:.2f}",
                         f"{shared['top1_agreement']:.1f} %", f"{requantized['top1_agreement']:.1f} %"])
    return tabulate(rows, headers=["model", "SQNR dB, shared", "SQNR dB, requantized", "top-1 agree, shared",
                                   "top-1 agree, requantized"], tablefmt="github")


def compare_joins(store: Store, calibration: torch.Tensor, scored: torch.Tensor) -> None:
    for name in JOINING:
        model = build(name)
        requantizing = [convert_requantizing_joins if p is convert else p for p in fxq.PASSES]
        entry = dict(store.get(name, {}))
        for key, passes in (("joins shared", None), ("joins requantized", requantizing)):
            entry[key] = asdict(attempt(run_fxq, model, calibration, scored, passes))
        store.put(name, entry)
        print(name, json.dumps({k: entry[k] for k in ("joins shared", "joins requantized")}), flush=True)
    readme.write("zoo-joins", joins_table(store.data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--no-reference", action="store_true", help="skip torch.ao")
    parser.add_argument("--joins", action="store_true", help="only the concatenation comparison")
    args = parser.parse_args()
    torch.set_num_threads(2)
    store = Store(RESULTS)
    calibration, scored = images(CALIBRATION, 1), images(SCORED, 2)
    if args.joins:
        compare_joins(store, calibration, scored)
        print(joins_table(store.data))
        return
    for name in args.models:
        model = build(name)
        entry = dict(store.get(name, {}))
        entry["fxq"] = asdict(attempt(run_fxq, model, calibration, scored))
        if not args.no_reference:
            entry["torch.ao"] = asdict(attempt(run_torch_ao, model, calibration, scored))
        store.put(name, entry)
        print(name, json.dumps(entry), flush=True)
    ordered = {name: store.data[name] for name in MODELS if name in store}
    text = table(ordered)
    readme.write("zoo", text)
    print(text)


if __name__ == "__main__":
    main()
