"""trace: a user's ``nn.Module`` → a ``GraphModule`` of a deep copy (the user's model is untouched)."""
from __future__ import annotations

import copy
import traceback

from torch import fx, nn

from fxq.context import PassContext


class _PathTracer(fx.Tracer):
    """A symbolic tracer that remembers which submodule it is inside, for error messages."""

    def __init__(self):
        super().__init__()
        self.path: list[str] = []
        self.failed_in: str | None = None  # the innermost submodule an error came from

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.path[-1]
            raise
        finally:
            self.path.pop()


def trace(model: nn.Module, ctx: PassContext) -> fx.GraphModule:
    """Symbolically trace an eval-mode deep copy of ``model``.

    Before: any ``nn.Module``. After: a ``GraphModule`` with the same submodules and the same
    numerics. A model torch.fx cannot trace (data-dependent control flow, ...) raises a
    ``TypeError`` naming the submodule and the source line, with the ways out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxq.quantize takes an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # torch.fx raises several types; all mean "cannot trace"
        where = f"submodule '{tracer.failed_in}'" if tracer.failed_in else "the top-level module"
        raise TypeError(
            f"torch.fx cannot trace {type(model).__name__}: in {where} ({_user_line(error)}): "
            f"{type(error).__name__}: {error}. Fix: replace Python control flow on tensor values "
            "with tensor ops (torch.where, masking), or move the untraceable code into a function "
            "decorated with torch.fx.wrap so it is kept as one call"
        ) from error
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.graph.lint()
    return gm


def _user_line(error: BaseException) -> str:
    """The last traceback frame outside torch: the user's line that failed to trace."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "unknown line"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {frame.line}"
