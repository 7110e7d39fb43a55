"""The README's generated tables: each lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replaced(readme: str, marker: str, text: str) -> str:
    """``readme`` with the block ``marker`` holding ``text``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    return re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", readme, flags=re.S)


def write(marker: str, text: str) -> None:
    """Put ``text`` in the README's block ``marker``."""
    README.write_text(replaced(README.read_text(), marker, text))
