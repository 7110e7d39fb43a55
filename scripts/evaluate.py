"""The results table: float32 vs fxq int8 (vs torch.ao's FX x86 PTQ as a reference) per data set.

    python -m scripts.evaluate                       # both data sets: the table `make demo` prints
    python -m scripts.evaluate --reference --readme  # + torch.ao's row; results/evaluate.json + README

Accuracy is on the full 10k test set; calibration uses 512 training images (never test images).
Size is the saved file (`fxq.analysis.measure.saved_bytes`: fxq.save's, the ONNX file, or the float state
dict). Latency is the median over several runs with ``torch.set_num_threads(2)``. Op counts come
from the dtypes each op saw at run time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from fxq.analysis.measure import latency_ms, saved_bytes
from fxq.graphs.runtime import count_ops
from scripts import data, models, readme
from scripts.train import accuracy

RESULTS = Path(__file__).resolve().parent.parent / "results"
HEADERS = ("model", "test acc %", "vs float (pt)", "size MB", "× float", "ms, batch 1", "ms, batch 256",
           "quantize s", "integer ops", "float ops")
TITLES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}


@dataclass(frozen=True)
class Row:
    model: str
    accuracy: float          # % on the 10k test set
    vs_float: float          # points against float32: negative is accuracy lost
    size_mb: float
    size_ratio: float        # of the float32 state dict
    ms_batch1: float
    ms_batch256: float
    quantize_s: float        # wall time of the quantization call (calibration included)
    integer_ops: int
    float_ops: int


# What torch.ao says about itself on the way: it is deprecated, and so are its observers' reduce_range
# and quantized tensors. True, and the reason fxq does not use it; a reference row repeats nothing.
TORCH_AO_NOTICES = (r"torch\.ao\.quantization is deprecated", r"(?s).*reduce_range will be deprecated",
                    r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor")


@contextlib.contextmanager
def torch_ao_notices_silenced():
    """Within: torch.ao's own deprecation notices are not shown (every other warning is)."""
    with warnings.catch_warnings():
        for notice in TORCH_AO_NOTICES:
            warnings.filterwarnings("ignore", message=notice)
        yield


def torch_ao_x86(model: torch.nn.Module, calib: list) -> torch.nn.Module:
    """The peer: torch.ao FX graph mode PTQ with the x86 default qconfig (reference only)."""
    with torch_ao_notices_silenced():
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        example = (calib[0][0][:1],)
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for images, _ in calib:
                prepared(images)
        return convert_fx(prepared)


def torch_ao_fake_quant(model: torch.nn.Module, calib: list, weight_bits: int, act_bits: int) -> torch.nn.Module:
    """The peer below 8 bits: torch.ao FX's fake quantization, calibrated and not trained (PTQ).
    Every conv/linear's weights symmetric per channel at ``weight_bits`` (narrow range, as fxq's),
    every activation torch.ao quantizes at ``act_bits`` with its PTQ histogram observer (reference only).
    torch.ao leaves the outputs of sigmoid and hardsigmoid in float here: it quantizes them only
    with its fixed 0..1 ranges, so it says it ignores this config for them (silenced)."""
    with torch_ao_notices_silenced(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="QConfig must specify a FixedQParamsObserver")
        from torch.ao import quantization as ao
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        weight_max = (1 << (weight_bits - 1)) - 1
        qconfig = ao.QConfig(
            activation=ao.FakeQuantize.with_args(observer=ao.HistogramObserver, quant_min=0,
                                                 quant_max=(1 << act_bits) - 1, dtype=torch.quint8),
            weight=ao.FakeQuantize.with_args(observer=ao.PerChannelMinMaxObserver, quant_min=-weight_max,
                                             quant_max=weight_max, dtype=torch.qint8,
                                             qscheme=torch.per_channel_symmetric, ch_axis=0))
        # prepare_qat_fx folds batch-norm into each conv's fake-quantized weight; in eval mode
        # with the observers on and fake quantization off, a pass over the data calibrates it
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), ao.QConfigMapping().set_global(qconfig),
                                  (calib[0][0][:1],)).eval()
        prepared.apply(ao.disable_fake_quant)
        with torch.no_grad():
            for images, _ in calib:
                prepared(images)
        prepared.apply(ao.disable_observer)
        prepared.apply(ao.enable_fake_quant)
        return prepared


def timed(make):
    start = time.perf_counter()
    result = make()
    return result, time.perf_counter() - start


def measure(name: str, model, test: data.Split, float_bytes: int, float_acc: float | None,
            quantize_s: float, runs: int, graph=None) -> Row:
    """``graph``: the GraphModule whose ops ``model`` runs (a deployed model is a session)."""
    acc = accuracy(model, test)
    ops = count_ops(graph if graph is not None else model, test.images[:2])
    size = saved_bytes(model)
    return Row(name, round(acc, 2), round(acc - (float_acc if float_acc is not None else acc), 2),
               round(size / 1e6, 2), round(size / float_bytes, 4),
               round(latency_ms(model, test.images[:1], runs * 10), 2),
               round(latency_ms(model, test.images[:256], runs), 1),
               round(quantize_s, 2), ops.integer, ops.float)


def evaluate(dataset: str, reference: bool, runs: int = 5, deploy: bool = True) -> list[Row]:
    torch.set_num_threads(2)
    model = models.load_trained(dataset)
    test = data.load(dataset, "test")
    calib = data.calibration_batches(dataset, 512)
    float_bytes = saved_bytes(model)
    traced = torch.fx.symbolic_trace(model)  # a GraphModule, so its ops can be counted too
    rows = [measure("float32", traced, test, float_bytes, None, 0.0, runs)]
    qmodel, seconds = timed(lambda: fxq.quantize(model, calib))
    rows.append(measure("fxq int8 (W8A8)", qmodel, test, float_bytes, rows[0].accuracy, seconds, runs))
    if deploy:  # the same model: by default it computes onnxruntime's arithmetic, so deploys bit-exact
        deployed = fxq.deploy(qmodel, test.images[:1], threads=2)
        agreement = "bit-exact" if deployed.bit_exact else "NOT bit-exact"
        rows.append(measure(f"fxq deployed (onnxruntime, {agreement}, weights {deployed.weight_format})",
                            deployed, test, float_bytes,
                            rows[0].accuracy, seconds, runs, graph=qmodel))
    if reference:
        peer, seconds = timed(lambda: torch_ao_x86(model, calib))
        rows.append(measure("torch.ao FX x86 (reference)", peer, test, float_bytes,
                            rows[0].accuracy, seconds, runs))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=data.DATASETS, default=list(data.DATASETS))
    parser.add_argument("--reference", action="store_true", help="add torch.ao's FX x86 PTQ as a row")
    parser.add_argument("--no-deploy", action="store_true", help="skip the deployed (onnxruntime) row")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--readme", action="store_true",
                        help="write results/evaluate.json and the README's results tables")
    args = parser.parse_args(argv)
    report = {dataset: [asdict(r) for r in evaluate(dataset, args.reference, args.runs, not args.no_deploy)]
              for dataset in args.datasets}
    for dataset, rows in report.items():
        print("\n" + table(dataset, rows))
    if args.readme:
        machine = readme.machine(torch.get_num_threads())
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "evaluate.json").write_text(json.dumps(
            {"command": "python -m scripts.evaluate --reference --readme", "machine": machine,
             "results": report}, indent=2) + "\n")
        publish(machine, report)


def table(dataset: str, rows: list[dict]) -> str:
    return (f"**{TITLES[dataset]}** — ResNet-18 (float trained by `scripts/train.py`), "
            f"10k test images, calibration 512 training images\n\n"
            + tabulate([list(r.values()) for r in rows], headers=HEADERS, tablefmt="github"))


def publish(machine: dict, report: dict[str, list[dict]]) -> None:
    """The README's results block, from what `main` measured (results/evaluate.json)."""
    readme.write("results", f"Measured on {machine['cpu']} (torch capability {machine['capability']}), "
                            f"torch {machine['torch']}, {machine['threads']} threads.\n\n"
                 + "\n\n".join(table(dataset, rows) for dataset, rows in report.items()))


if __name__ == "__main__":
    main()
