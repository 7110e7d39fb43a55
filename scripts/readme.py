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


def blocks_kept(new: str, old: str) -> str:
    """``new`` with each of its blocks holding what ``old`` has there: a page written whole keeps
    the tables other scripts fill in it."""
    for marker in re.findall(r"<!-- ([\w-]+):start -->", new):
        found = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", old, flags=re.S)
        if found:
            new = replaced(new, marker, found.group(1))
    return new


def vs_float(accuracy: float, float_accuracy: float) -> str:
    """Points against float, the command's sign: negative is accuracy lost."""
    return f"{accuracy - float_accuracy:+.2f}"


def write(marker: str, text: str, path: Path = README) -> None:
    """Put ``text`` in the block ``marker`` of ``path`` (the README), which must have one."""
    content = path.read_text()
    if f"<!-- {marker}:start -->" not in content:
        raise ValueError(f"{path} has no <!-- {marker}:start --> … <!-- {marker}:end --> block to fill")
    path.write_text(replaced(content, marker, text))


def publish(marker: str, text: str) -> None:
    """The README's block ``marker`` holds ``text``, which is printed too."""
    write(marker, text)
    print(text)


def machine(threads: int) -> dict:
    """What a table's numbers were measured on: the CPU by name and torch's capability for it."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())
    return {"cpu": name, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": threads}
