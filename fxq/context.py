"""What every pass receives besides the graph."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fxq.config import QConfig


@dataclass(frozen=True)
class PassContext:
    """The configuration and the calibration data; every pass is ``(gm, ctx) -> gm``.

    ``overrides`` maps module-name glob patterns (``"layer4.*"``, ``"fc"``) to the ``QConfig`` of
    the layers they match, or to ``None`` to keep those layers in float. The first matching
    pattern wins; layers no pattern matches use ``config``.
    """

    config: QConfig
    calib_loader: Iterable
    overrides: Mapping[str, QConfig | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pattern, override in self.overrides.items():
            if not isinstance(pattern, str) or not (override is None or isinstance(override, QConfig)):
                raise TypeError(f"overrides[{pattern!r}] = {override!r}: map a module-name glob "
                                "(str) to an fxq.QConfig, or to None to keep the layer in float")

    def config_for(self, name: str) -> QConfig | None:
        """The config of the module at ``name`` (None: the layer stays float)."""
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return override
        return self.config

    def check_overrides(self, names: list[str]) -> None:
        """Every pattern must match one of ``names`` (the quantizable layers)."""
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
                raise ValueError(
                    f"overrides pattern {pattern!r} matches no layer. Close matches: {close or 'none'}; "
                    f"layers are named like {names[:3]} (module paths, globs allowed: 'layer4.*')"
                )
