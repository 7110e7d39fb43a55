"""The studies' JSON files under results/: read once, written again after every new result, so a
long run that stops keeps what it measured and the next run measures only what is missing."""
from __future__ import annotations

import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "results"


class Store:
    """A JSON object on disk, as a dict; :meth:`put` sets one entry and saves the file."""

    def __init__(self, path: Path):
        self.path = path
        loaded = json.loads(path.read_text()) if path.exists() else {}
        self.data: dict = loaded if isinstance(loaded, dict) else {}

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")
