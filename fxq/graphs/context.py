"""What every pass receives besides the graph."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fxq.config import QConfig


@dataclass
class PassContext:
    """The configuration and the calibration data; every pass is ``(gm, ctx) -> gm``.

    A plain mutable object, and one thing in it changes: `passes.insert_observers` records the
    network's layers with :meth:`register_layers`. Until then ``keep_first_last_8bit`` cannot
    know the first and last layer, so :meth:`config_for` answers for the layers as configured.

    ``overrides`` maps module-name glob patterns (``"layer4.*"``, ``"fc"``) to the ``QConfig`` of
    the layers they match, or to ``None`` to keep those layers in float. The first matching
    pattern wins; layers no pattern matches use ``config``, and with its ``keep_first_last_8bit``
    the first and last of them (in graph order, set by :meth:`register_layers`) and the network
    input are at 8 bits.
    """

    config: QConfig
    calib_loader: Iterable
    overrides: Mapping[str, QConfig | None] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)  # the quantizable layers, in graph order
    modules: list[str] = field(default_factory=list)  # every called module, in graph order
    # Integer weights already chosen, by call sites and weight config (`quantize_sites`): one
    # `fxq.api.Calibrated` shares them across its configs, as their weights and statistics are one.
    chosen_weights: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pattern, override in self.overrides.items():
            if not isinstance(pattern, str) or not (override is None or isinstance(override, QConfig)):
                raise TypeError(f"overrides[{pattern!r}] = {override!r}: map a module-name glob "
                                "(str) to an fxq.QConfig, or to None to keep the layer in float")

    def config_for(self, name: str) -> QConfig | None:
        """The config of the module at ``name`` (None: the layer stays float). An override wins;
        otherwise ``keep_first_last_8bit`` of the network's config may hold the layer at 8 bits."""
        for pattern, override in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                return override
        if self.config.keep_first_last_8bit and name in self.layers[:1] + self.layers[-1:]:
            return _at_8_bits(self.config)
        return self.config

    def input_config(self) -> QConfig:
        """The config of the network input's quantization."""
        return _at_8_bits(self.config) if self.config.keep_first_last_8bit else self.config

    def register_layers(self, names: list[str], modules: list[str] | None = None) -> None:
        """Record the layers with weights (graph order); every override pattern must match one of
        the graph's ``modules`` (default: the layers)."""
        self.layers = list(names)
        modules = names if modules is None else modules
        self.modules = list(modules)
        for pattern in self.overrides:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in modules):
                close = difflib.get_close_matches(pattern, modules, n=5, cutoff=0.4)
                raise ValueError(
                    f"overrides pattern {pattern!r} matches no layer. Close matches: {close or 'none'}; "
                    f"modules are named like {modules[:3]} (module paths, globs allowed: 'layer4.*')"
                )


def _at_8_bits(config: QConfig) -> QConfig:
    """The config of a layer ``keep_first_last_8bit`` holds at 8 bits. It learns its rounding and
    output step when the network does: MobileNetV2 at W3A3 lost 6.70 points with its first and
    last layers left to the rule, 4.31 with them learning too."""
    return config.with_bits(8, 8).replace(reconstruct=config.reconstruct)
