"""Command-line entry points and the project's data/model helpers (not part of the fxq product)."""
