"""The low-bit study: every network of the model suite from W8A8 down to W2A4, with the weight
rules alone, with learned rounding and ranges (`passes.reconstruct`, fxq's default below 8 bits),
and torch.ao's fake-quantized PTQ beside them (a reference).

    python -m scripts.reconstruct_study                       # results/reconstruct.json + README block
    python -m scripts.reconstruct_study --networks fashion    # some networks (the table: all measured)
    python -m scripts.reconstruct_study --fresh               # measure again what the JSON holds

Full 10k Fashion-MNIST (or MNIST) test sets, 512 training images to calibrate (and learn on), fxq's
defaults for each width otherwise; seconds are `fxq.quantize`'s wall time (calibration and
learning). torch.ao quantizes every layer at the width (fxq keeps the input, first and last
layers at 8 bits below 8: its defaults).
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from scripts import data, models, readme
from scripts.evaluate import torch_ao_fake_quant
from scripts.readme import vs_float
from scripts.results import Store
from scripts.sweeps import key_of
from scripts.train import accuracy

RESULTS = Path(__file__).resolve().parent.parent / "results" / "reconstruct.json"
NETWORKS = (*models.BRANCHED, *models.SUITE)  # `--networks` measures a few of them
WIDTHS = ((8, 8), (6, 6), (4, 8), (4, 4), (3, 3), (2, 4))
KINDS = ("rule", "learned", "torch.ao")
THREADS = 2


def measure(fresh: bool, networks: list[str]) -> Store:
    """Every run of ``networks`` not in the JSON yet (keyed by every config field: a changed
    default is measured again)."""
    store = Store(RESULTS)
    if fresh:
        store.data.clear()
    runs = store.get("runs", [])
    for name in networks:
        dataset = models.RECIPES[name].dataset
        test, calib = data.load(dataset, "test"), data.calibration_batches(dataset, 512)
        model = models.load_trained(name)
        for key, make in [({"model": name, "float": True}, lambda: (model, 0.0)),
                          *((k, _maker(model, calib, k)) for k in _keys(name))]:
            if _find(runs, key) is None:
                qmodel, seconds = make()
                runs.append({"key": key, "accuracy": accuracy(qmodel, test), "seconds": seconds,
                             "machine": readme.machine(THREADS)})
                print(name, runs[-1], flush=True)
                store.put("runs", runs)
    return store


def _keys(name: str) -> list[dict]:
    keys = []
    for weight_bits, act_bits in WIDTHS:
        keys += [key_of(fxq.QConfig(weight_bits=weight_bits, act_bits=act_bits, reconstruct=learn), model=name)
                 for learn in (False, True)]
        keys.append({"model": name, "peer": "torch.ao fake-quant", "weight_bits": weight_bits, "act_bits": act_bits})
    return keys


def _maker(model, calib, key: dict):
    def make():
        start = time.perf_counter()
        if "peer" in key:
            qmodel = torch_ao_fake_quant(model, calib, key["weight_bits"], key["act_bits"])
        else:
            config = fxq.QConfig(**{k: v for k, v in key.items() if k != "model"})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fxq.FloatFallbackWarning)
                qmodel = fxq.quantize(model, calib, config)
        return qmodel, time.perf_counter() - start
    return make


def _find(runs: list[dict], key: dict) -> dict | None:
    return next((r for r in runs if r["key"] == key), None)


def table(store: Store) -> str:
    """Every network measured whole; the rest named with the command that measures them."""
    runs, rows, machines = store.get("runs", []), [], []
    missing = [name for name in NETWORKS if any(_find(runs, k) is None for k in [{"model": name, "float": True},
                                                                                   *_keys(name)])]
    for name in (n for n in NETWORKS if n not in missing):
        float_acc = _find(runs, {"model": name, "float": True})["accuracy"]
        keys = iter(_keys(name))
        for weight_bits, act_bits in WIDTHS:
            rule, learned, peer = found = [_find(runs, next(keys)) for _ in KINDS]
            for run in found:
                if run["machine"] not in machines:
                    machines.append(run["machine"])
            default = "learned" if fxq.QConfig(weight_bits=weight_bits, act_bits=act_bits).reconstruct else "rule"
            rows.append([name, models.RECIPES[name].architecture, f"{float_acc:.2f}", f"W{weight_bits}A{act_bits}",
                         vs_float(rule["accuracy"], float_acc), vs_float(learned["accuracy"], float_acc), default,
                         vs_float(peer["accuracy"], float_acc), f"{rule['seconds']:.0f}", f"{learned['seconds']:.0f}"])
    where = "; ".join(f"{m['cpu']} ({m['capability']}), torch {m['torch']}, {m['threads']} threads" for m in machines)
    return (tabulate(rows, headers=["model", "network", "float %", "width", "weight rule vs float",
                                    "learned vs float", "fxq default", "torch.ao fake-quant vs float",
                                    "s (rule)", "s (learned)"], tablefmt="github")
            + f"\n\n{where}; `python -m scripts.reconstruct_study`."
            + (f" Not measured yet: {', '.join(missing)} (`python -m scripts.reconstruct_study --networks "
               f"{' '.join(missing)}`)." if missing else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="measure again what results/reconstruct.json holds")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    readme.publish("reconstruct", table(measure(args.fresh, args.networks)))


if __name__ == "__main__":
    main()
