"""Calibration and full-test evaluation on 1 and 2 processes (torch.distributed, gloo, loopback),
and the bytes each rank sends per observer.

    python -m scripts.bench_distributed      # writes results/bench_distributed.json and a table

The MNIST ResNet-18; 512 training images calibrate, the 10,000 test images evaluate
(`fxq.evaluate` on fxq's integer executor). Settings: one process with one thread (one core),
one process with 2 threads (this machine's 2 cores by torch's intra-op threads), two processes
with one thread each (the 2 cores by torch.distributed, each rank holding half the batches). Times are
wall times between barriers, medians of ``--runs``. Bytes: the payload each rank hands to
all-reduce while one observer synchronizes (a ring all-reduce sends about 2·(N − 1)/N of it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tabulate import tabulate

import fxq
from fxq.integers import observers
from scripts import data, models

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench_distributed.json"
SETTINGS = ((1, 1), (1, 2), (2, 1))  # (processes, threads each)
RULES = {"minmax": fxq.QConfig(), "entropy": fxq.QConfig(act_range="entropy"),
         "output_aware (W4)": fxq.QConfig(weight_bits=4, act_bits=8, bias_correction=False)}


def _count_bytes(sent: list) -> None:
    """Record (observer kind, bytes all-reduced) for every observer's synchronize on this rank."""
    reduce = dist.all_reduce
    state = {"bytes": 0, "depth": 0}  # depth: a histogram's synchronize calls its min-max one

    def all_reduce(tensor, *args, **kwargs):
        state["bytes"] += tensor.numel() * tensor.element_size()
        return reduce(tensor, *args, **kwargs)

    def counted(original):
        def synchronize(self):
            if state["depth"] == 0:  # not the counts all-reduced between observers' turns
                state["bytes"] = 0
            state["depth"] += 1
            try:
                original(self)
            finally:
                state["depth"] -= 1
                if state["depth"] == 0:
                    sent.append((type(self).__name__, state["bytes"]))
                    state["bytes"] = 0
        return synchronize

    dist.all_reduce = all_reduce
    for cls in (observers.MinMaxObserver, observers.HistogramObserver, observers.InputGram):
        cls.synchronize = counted(cls.__dict__["synchronize"])


def _timed(run, runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        dist.barrier()
        start = time.perf_counter()
        result = run()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _worker(rank: int, world: int, threads: int, folder: str, runs: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    sent: list = []
    _count_bytes(sent)
    model = models.load_trained("mnist")
    calib = data.calibration_batches("mnist", 512)[rank::world]
    test = data.load("mnist", "test")
    shard = list(zip(test.images.split(250), test.labels.split(250)))[rank::world]
    result = {"processes": world, "threads": threads, "quantize_s": {}}
    for rule, config in RULES.items():
        sent.clear()
        result["quantize_s"][rule], qmodel = _timed(lambda: fxq.quantize(model, calib, config), runs)
        by_kind: dict[str, list[int]] = {}
        for kind, size in sent[: len(sent) // runs]:  # one run's observers
            by_kind.setdefault(kind, []).append(size)
        result.setdefault("bytes_per_observer", {})[rule] = {k: [min(v), max(v), len(v)] for k, v in by_kind.items()}
        if rule == "minmax":
            result["evaluate_s"], evaluation = _timed(lambda: fxq.evaluate(qmodel, shard), runs)
            result["accuracy"] = evaluation.accuracy
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(processes: int, threads: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(processes, threads, folder, runs), nprocs=processes, join=True)
        return json.loads(Path(folder, "result.json").read_text())


def table(results: list[dict]) -> str:
    """Seconds, and the speed-up over one process with one thread."""
    one = results[0]

    def cell(seconds: float, reference: float) -> str:
        return f"{seconds:.2f} ({reference / seconds:.2f}×)"

    rows = [[f"{r['processes']} × {r['threads']}", cell(r["evaluate_s"], one["evaluate_s"]), f"{r['accuracy']:.2f}",
             *[cell(r["quantize_s"][rule], one["quantize_s"][rule]) for rule in RULES]] for r in results]
    return tabulate(rows, headers=["processes × threads", "evaluate 10k, s (speed-up)", "accuracy %",
                                   *[f"quantize {rule}, s (speed-up)" for rule in RULES]], tablefmt="github")


def bytes_table(result: dict) -> str:
    rows = []
    for rule, kinds in result["bytes_per_observer"].items():
        for kind, (low, high, count) in kinds.items():
            rows.append([rule, kind, count, f"{low:,}" if low == high else f"{low:,} … {high:,}"])
    return tabulate(rows, headers=["rule", "observer", "observers", "bytes each rank all-reduces"],
                    tablefmt="github")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    results = [measure(p, t, args.runs) for p, t in SETTINGS]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python -m scripts.bench_distributed", "torch": torch.__version__,
                                   "results": results}, indent=2) + "\n")
    print(table(results))
    print()
    print(bytes_table(results[-1]))


if __name__ == "__main__":
    main()
