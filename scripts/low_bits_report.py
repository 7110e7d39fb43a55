"""docs/low_bits.md from results/low_bits_<dataset>.json (run `python -m scripts.low_bits` first).

    python -m scripts.low_bits_report
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import fxq  # noqa: E402
from fxq.analysis.comparison import folded_float  # noqa: E402
from fxq.analysis.explanation import signed_bits  # noqa: E402
from fxq.analysis.measure import latency_ms  # noqa: E402
from fxq.ops.layers import QLayer  # noqa: E402
from scripts import data, models, readme  # noqa: E402
from scripts.low_bits import (  # noqa: E402
    CURVE_BUDGETS,
    METHODS,
    MIXED,
    PLACEMENT_WIDTHS,
    SETTINGS,
    config_of,
    defaults_study,
)
from scripts.sweeps import RESULTS, SUBSET, Cache, key_of  # noqa: E402

ROOT = RESULTS.parent
DOC, IMG = ROOT / "docs" / "low_bits.md", ROOT / "docs" / "img"
TEMPLATE = ROOT / "scripts" / "low_bits_template.md"  # the prose; tables and numbers filled in
NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}


class Results:
    def __init__(self, dataset: str):
        self.cache = Cache(RESULTS / f"low_bits_{dataset}.json")
        self.float = self.cache.get({"float": True})

    def get(self, config: fxq.QConfig, **tags) -> dict | None:
        return self.cache.get(key_of(config, **tags))

    def lookup(self, config: fxq.QConfig) -> dict | None:
        """A run of ``config``, on the subset alone or as a headline run (which has both)."""
        return self.get(config) or self.get(config, full=True)

    def cell(self, record: dict | None, full: bool = False) -> str:
        if record is None:
            return "not run"
        field = "full_accuracy" if full else "accuracy"
        return f"{record[field]:.2f} ({record[field] - self.float[field]:+.2f})"

    def size(self, record: dict | None) -> str:
        return "—" if record is None else f"{record['bytes'] / self.float['bytes']:.3f}×"


def headline(results: dict[str, Results]) -> str:
    rows = []
    for setting in SETTINGS:
        row = [setting]
        for r in results.values():
            record = r.get(config_of(setting, {}), full=True)
            row += [r.cell(record, full=True), r.size(record)]
        rows.append(row)
    headers = ["fxq defaults"] + [f"{NAMES[d]} {c}" for d in results for c in ("accuracy (Δ)", "size")]
    floats = ["float32"] + [v for r in results.values()
                            for v in (f"{r.float['full_accuracy']:.2f}", f"1× ({r.float['bytes'] / 2**20:.1f} MiB)")]
    return tabulate([floats] + rows, headers=headers, tablefmt="github")


def methods_table(r: Results) -> str:
    rows = []
    for setting in SETTINGS:
        row = [setting, r.size(r.get(config_of(setting, METHODS["min-max"])))]
        for name, method in METHODS.items():
            row.append(r.cell(r.lookup(config_of(setting, method))) if setting != "W8A8" or name in
                       ("min-max", "fxq defaults") else "—")
        mixed = r.cache.get({"search_bits": setting, "budgets": _budgets(setting)}) if setting in MIXED else None
        row.append("—" if setting not in MIXED else
                   "not run" if mixed is None else f"{r.cell(mixed)}, {r.size(mixed)}")
        rows.append(row)
    headers = ["setting", "size"] + list(METHODS) + ["+ mixed precision (same avg bits)"]
    return tabulate(rows, headers=headers, tablefmt="github")


def _budgets(setting: str) -> list:
    return list(CURVE_BUDGETS) if setting == "W4A8" else [SETTINGS[setting][0]]


def defaults_table(r: Results) -> str:
    rows = []
    for setting, method in defaults_study():
        rows.append((setting, "on" if method["cross_layer_equalization"] else "off",
                     "on" if method["bias_correction"] else "off",
                     r.cell(r.get(config_of(setting, method), full=True), full=True)))
    return tabulate(rows, headers=["setting (output-aware weights, best act. range)", "CLE",
                                   "bias correction", "accuracy, full 10k (Δ)"], tablefmt="github")


def placement_table(r: Results) -> str:
    rows = []
    for bits in PLACEMENT_WIDTHS:
        for method in ("min-max", "fxq defaults"):
            row = [f"W{bits}A{bits}", method]
            for placement in fxq.config.PLACEMENTS:
                config = fxq.QConfig(weight_bits=bits, act_bits=bits, placement=placement, **METHODS[method])
                row.append(r.cell(r.lookup(config)))
            rows.append(row)
    return tabulate(rows, headers=["width", "ranges"] + [f'placement="{p}"' for p in fxq.config.PLACEMENTS],
                    tablefmt="github")


def _delta(r: Results, config: fxq.QConfig) -> float | None:
    record = r.lookup(config)
    return None if record is None else record["accuracy"] - r.float["accuracy"]


def _points(value: float | None) -> str:
    return "not run" if value is None else f"{value:+.2f}"


def placement_analysis(results: dict[str, Results]) -> str:
    """The placement table in sentences: what moving the quantization past the ReLU buys."""
    lines = []
    for bits in PLACEMENT_WIDTHS:
        parts = []
        for dataset, r in results.items():
            deltas = {(m, p): _delta(r, fxq.QConfig(weight_bits=bits, act_bits=bits, placement=p, **METHODS[m]))
                      for m in ("min-max", "fxq defaults") for p in fxq.config.PLACEMENTS}
            parts.append(f"{NAMES[dataset]}: min-max pre / post / both "
                         + " / ".join(_points(deltas[("min-max", p)]) for p in fxq.config.PLACEMENTS)
                         + ", defaults " + " / ".join(_points(deltas[("fxq defaults", p)])
                                                       for p in fxq.config.PLACEMENTS))
        lines.append(f"- W{bits}A{bits} (points vs float) — " + "; ".join(parts) + ".")
    return "\n".join(lines)


def cle_analysis(results: dict[str, Results]) -> str:
    lines = []
    for dataset, r in results.items():
        plain = _delta(r, config_of("W4A8 per-tensor", METHODS["min-max"]))
        cle = _delta(r, config_of("W4A8 per-tensor", {**METHODS["min-max"], "cross_layer_equalization": True}))
        best = _delta(r, config_of("W4A8 per-tensor", METHODS["best ranges"]))
        best_cle = _delta(r, config_of("W4A8 per-tensor", METHODS["+ CLE"]))
        lines.append(f"- {NAMES[dataset]}, per-tensor W4A8: min-max {_points(plain)} → with CLE "
                     f"{_points(cle)}; best ranges {_points(best)} → with CLE {_points(best_cle)} (points vs float).")
    return "\n".join(lines)


def size_plot(results: dict[str, Results]) -> str:
    fig, axes = plt.subplots(1, len(results), figsize=(11, 4))
    for ax, (dataset, r) in zip(axes, results.items()):
        for name, method in METHODS.items():
            points = [(rec["bytes"] / 2**20, rec["accuracy"], s) for s in SETTINGS
                      if (rec := r.lookup(config_of(s, method)))]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], label=name, s=18)
        curve = r.cache.get({"search_bits": "W4A8", "budgets": list(CURVE_BUDGETS)})
        if curve:
            ax.plot([p["weight_bytes"] / 2**20 for p in curve["curve"]], [p["accuracy"] for p in curve["curve"]],
                    "k.--", lw=1, label="search_bits, A8 (weights only)")
        ax.axhline(r.float["accuracy"], color="grey", lw=0.8, ls=":", label="float")
        ax.set_ylim(max(0, r.float["accuracy"] - 15), r.float["accuracy"] + 1)
        ax.set_xlabel("model size (MiB)")
        ax.set_ylabel(f"accuracy on {SUBSET} test images (%)")
        ax.set_title(NAMES[dataset])
        ax.legend(fontsize=7)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / "low_bits_size_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.relative_to(DOC.parent).as_posix()


def mixed_section(dataset: str, r: Results) -> str:
    record = r.cache.get({"search_bits": "W4A8", "budgets": list(CURVE_BUDGETS)})
    if record is None:
        return f"(not run for {NAMES[dataset]})\n"
    rows = [(f"{p['budget']:g}", f"{p['avg_weight_bits']:.2f}", f"{p['weight_bytes'] / 2**20:.2f}",
             f"{p['accuracy']:.2f}", " ".join(str(b) for b in p["bits"].values())) for p in record["curve"]]
    table = tabulate(rows, headers=["budget", "avg weight bits", "weights (MiB, packed)",
                                    f"accuracy ({SUBSET} test images)", "bits per layer (graph order)"],
                     tablefmt="github")
    chosen = ", ".join(f"`{n}` {b}" for n, b in record["bits"].items())
    return f"{table}\n\nChosen at 4.0 bits: {chosen}.\n"


def outlier_table() -> str:
    """How unequal the output channels' weight ranges are, before and after CLE (Fashion)."""
    model = models.load_trained("fashion")
    before = folded_float(model)
    after = folded_float(model, fxq.QConfig(cross_layer_equalization=True))
    rows = []
    for name, layer in before.named_modules():
        if isinstance(layer, torch.nn.Conv2d) and "." in name and "downsample" not in name:
            spread = [_range_spread(m.weight) for m in (layer, after.get_submodule(name))]
            rows.append((name, f"{spread[0]:.1f}", f"{spread[1]:.1f}"))
    return tabulate(rows, headers=["layer", "largest / smallest channel range, folded", "after CLE"],
                    tablefmt="github")


def _range_spread(weight: torch.Tensor) -> float:
    ranges = weight.detach().reshape(weight.shape[0], -1).abs().amax(1)
    return float(ranges.max() / ranges.min())


def accumulator_table() -> str:
    """Worst-case accumulator width per setting on the Fashion ResNet-18 (min-max, fast)."""
    model, calib = models.load_trained("fashion"), data.calibration_batches("fashion", 128)
    x = data.load("fashion", "test").images[:256]
    rows = []
    for name, (wb, ab) in {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W8A16": (8, 16)}.items():
        config = fxq.QConfig(weight_bits=wb, act_bits=ab, **METHODS["min-max"])
        qmodel = fxq.quantize(model, calib, config)
        layers = [m for m in qmodel.modules() if isinstance(m, QLayer)]
        worst = max(signed_bits(-m.accumulator_bound, m.accumulator_bound) for m in layers)
        wide = sum(m.accumulator_bits == 64 for m in layers)
        torch.set_num_threads(2)
        latency = latency_ms(qmodel, x, runs=3)
        rows.append((name, worst, f"{wide} of {len(layers)}", f"{latency:.0f}"))
    return tabulate(rows, headers=["setting", "widest worst-case accumulator (bits)", "layers needing int64",
                                   "latency, batch 256 (ms)"], tablefmt="github")


def write() -> None:
    results = {d: Results(d) for d in ("fashion", "mnist")}
    results = {d: r for d, r in results.items() if r.float is not None}
    body = TEMPLATE.read_text().format(
        headline=headline(results),
        methods="\n\n".join(f"**{NAMES[d]}**\n\n{methods_table(r)}" for d, r in results.items()),
        plot=size_plot(results),
        placement="\n\n".join(f"**{NAMES[d]}**\n\n{placement_table(r)}" for d, r in results.items()),
        mixed="\n".join(f"**{NAMES[d]}**\n\n{mixed_section(d, r)}" for d, r in results.items()),
        accumulators=accumulator_table(),
        defaults=defaults_table(results["fashion"]),
        outliers=outlier_table(),
        placement_analysis=placement_analysis(results),
        cle_analysis=cle_analysis(results),
        subset=SUBSET,
    )
    DOC.write_text(readme.blocks_kept(body, DOC.read_text() if DOC.exists() else ""))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    write()
