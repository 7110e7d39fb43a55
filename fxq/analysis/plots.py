"""The report's figures (matplotlib, drawn off-screen), each returned as PNG bytes."""
from __future__ import annotations

import io

import torch

COLORS = ["#222222", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the report's plots need matplotlib: pip install 'fxq[report]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def summary(rows: list[dict]) -> bytes:
    """Accuracy, size and batch-1 latency of each model, side by side."""
    plt = _pyplot()
    names = [r["model"].split(" (")[0] for r in rows]
    panels = [_score(rows), ("size MB", "size (MB)"), ("ms batch 1", "latency, batch 1 (ms)")]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), [0 if v is None else v for v in values], color=COLORS[1:len(rows) + 1])
        ax.bar_label(bars, ["—" if v is None else f"{v:g}" for v in values], fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_title(title, fontsize=10)
        if key == "accuracy %":
            low = min(values)
            ax.set_ylim(max(0.0, low - 2 * (max(values) - low) - 1), 100)
    return _png(fig)


def _score(rows: list[dict]) -> tuple[str, str]:
    """The column that says how well each model does: accuracy, or (a model without classifier
    logits) its outputs' class agreement with float, or their SQNR."""
    if "accuracy %" in rows[0]:
        return "accuracy %", "accuracy (%)"
    if any(r["same class %"] is not None for r in rows):
        return "same class %", "same class as float (%)"
    return "worst output SQNR dB", "worst output SQNR (dB)"


def sqnr(names: list[str], cumulative: list[float], isolated: list[float]) -> bytes:
    """Per-layer SQNR, cumulative and isolated, in graph order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.plot(cumulative, "o-", color=COLORS[1], label="cumulative (everything before it quantized too)")
    ax.plot(isolated, "s--", color=COLORS[3], label="isolated (only this layer)")
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def histogram_with_clipping(values: torch.Tensor, clips: dict[str, tuple[float, float]], title: str,
                            xlabel: str) -> bytes:
    """A log-scale histogram of ``values`` and, per range rule, dashed lines at its range."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    flat = values.flatten().float()
    ax.hist(flat.numpy(), bins=int(min(200, max(20, flat.numel() // 20))), color="#cccccc")
    ax.set_yscale("log")
    for (rule, (lo, hi)), color in zip(clips.items(), COLORS):
        width = 2.2 if rule.startswith("used") else 1.1
        ax.axvline(lo, color=color, ls="--", lw=width)
        ax.axvline(hi, color=color, ls="--", lw=width, label=f"{rule}: [{lo:.3g}, {hi:.3g}]")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.legend(fontsize=7)
    return _png(fig)


def sensitivity(names: list[str], only: list[float], all_but: list[float]) -> bytes:
    """Accuracy change with only this layer quantized, and with all but this layer quantized."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    x = torch.arange(len(names)).numpy()
    ax.bar(x - 0.2, only, 0.4, color=COLORS[3], label="only this layer quantized (vs float)")
    ax.bar(x + 0.2, all_but, 0.4, color=COLORS[2], label="all but this layer (vs all quantized)")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("accuracy change (points)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _png(fig)
