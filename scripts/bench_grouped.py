"""How fxq runs grouped convolutions: the int8 GEMM per group against direct multiply-adds.

    python -m scripts.bench_grouped        # results/bench_grouped.json and a table

For each layer shape (MobileNetV2's depthwise convs at a 64×64 input, and a RegNet-style grouped
conv), the median time of formula (1) — the accumulator — by
  - "GEMM per group": im2col columns, one ``torch._int_mm`` per group (what grouped convs use),
  - "multiply-adds": k_h·k_w whole-map int32 multiply-adds (what depthwise convs use),
  - "float conv": torch's float32 grouped conv, for scale (not exact beyond 2^24),
on a batch of 32, 2 threads. Both integer forms give the same integers (checked here).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate

from fxq.integers import intmath

RESULTS = Path(__file__).resolve().parent.parent / "results" / "bench_grouped.json"
# (name, channels in, channels out, groups, spatial size, stride)
LAYERS = [("depthwise 32ch 32×32", 32, 32, 32, 32, 1), ("depthwise 144ch 16×16", 144, 144, 144, 16, 2),
          ("depthwise 960ch 2×2", 960, 960, 960, 2, 1), ("grouped 64ch, 4 groups 8×8", 64, 64, 4, 8, 1)]


def median_ms(run, repeats: int = 7) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def per_group_gemm(x, weight, bias, stride, zero_point):
    groups = x.shape[1] // weight.shape[1]
    columns, _ = intmath.conv_columns(x, (3, 3), stride, (1, 1), (1, 1), zero_point)
    blocks = intmath.group_columns(columns, groups, weight.shape[1])
    out = []
    for block, w, b in zip(blocks, weight.chunk(groups), bias.chunk(groups)):
        gemm, constant = intmath.gemm_operands(w, zero_point, b)
        out.append(intmath.accumulate(block, gemm, constant))
    return torch.cat(out, 1)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    for name, cin, cout, groups, size, stride in LAYERS:
        x = torch.randint(0, 256, (32, cin, size, size), dtype=torch.uint8)
        weight = torch.randint(-127, 128, (cout, cin // groups, 3, 3), dtype=torch.int8)
        bias = torch.randint(-1000, 1000, (cout,), dtype=torch.int32)
        s = (stride, stride)
        gemm = per_group_gemm(x, weight, bias, s, 3)
        row = {"layer": name, "GEMM per group ms": median_ms(lambda: per_group_gemm(x, weight, bias, s, 3))}
        if cin == groups:
            direct, _ = intmath.depthwise_accumulate(x, weight, bias, s, (1, 1), (1, 1), 3, torch.int32)
            assert torch.equal(direct.to(torch.int64), gemm.to(torch.int64))
            row["multiply-adds ms"] = median_ms(
                lambda: intmath.depthwise_accumulate(x, weight, bias, s, (1, 1), (1, 1), 3, torch.int32))
        xf, wf = x.float() - 3, weight.float()
        row["float conv ms"] = median_ms(lambda: F.conv2d(xf, wf, bias.float(), s, 1, 1, groups))
        rows.append(row)
        print(row, flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1))
    print(tabulate([[r.get(k, "") if not isinstance(r.get(k), float) else f"{r[k]:.2f}"
                     for k in ("layer", "GEMM per group ms", "multiply-adds ms", "float conv ms")] for r in rows],
                   headers=["layer", "GEMM per group ms", "multiply-adds ms", "float conv ms"], tablefmt="github"))


if __name__ == "__main__":
    main()
