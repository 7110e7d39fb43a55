"""The README's generated tables: each lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def replaced(readme: str, marker: str, text: str) -> str:
    """``readme`` with the block ``marker`` holding ``text``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", readme, flags=re.S)


def write(marker: str, text: str) -> None:
    """Put ``text`` in the README's block ``marker``."""
    README.write_text(replaced(README.read_text(), marker, text))


def machine(threads: int) -> dict:
    """What a table's numbers were measured on: the CPU by name and torch's capability for it."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())
    return {"cpu": name, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": threads}
