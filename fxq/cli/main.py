"""``fxq``: the command line. Each subcommand is one function of :mod:`fxq.cli.commands`.

Exit codes: 0 done, 1 failed (one line says what and how to fix; ``--debug`` shows the
traceback), 2 bad usage (argparse's convention, and any argument that names something unusable),
130 interrupted. ``--quiet``, ``--debug`` and ``--threads`` go before or after the command.

The parser imports nothing heavy: ``fxq --help`` and ``--version`` answer without torch, which a
command imports when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fxq.cli.usage import UsageError
from fxq.config import ACT_RANGES, MAX_BITS, MIN_BITS, PLACEMENTS, REQUANTIZE, RUNTIMES, WEIGHT_RANGES, WIDE_ACT_BITS
from passes import ORDER as PASS_NAMES

# a user's own network (mynets.py beside them, a factory returning the nn.Module) and its weights
MNIST = "--model mynets:mnist_cnn --weights mnist_cnn.pt --data mnist"

EXAMPLES = {
    "quantize": f"""examples:
  fxq quantize {MNIST} --out mnist.fxq
  fxq quantize --model resnet18 --weights r18.pt --data imagenet/ --image-size 224 --out r18.fxq
  fxq quantize --model mynets:build --data digits/ --w-bits 4 --a-bits 4 --out small.fxq
  fxq quantize {MNIST} --config config.toml --out mnist.fxq
(in this repository: --model scripts.models:resnet18_28x28 --weights checkpoints/resnet18_mnist.pt)

config.toml holds QConfig fields, and per-layer overrides (a glob: fields, or "float"):
  act_range = "percentile"
  [overrides]
  "layer4.*" = {{ weight_bits = 4 }}
  fc = "float"
""",
    "evaluate": f"""examples:
  fxq evaluate mnist.fxq --data mnist                     # fxq and deployed rows
  fxq evaluate mnist.fxq {MNIST}   # and the float row
""",
    "explain": """examples:
  fxq explain mnist.fxq                          # every op: scales, bits, accumulator headroom
  fxq explain mnist.fxq layer1.0.conv1 --data mnist   # one layer, step by step, checked in int64
""",
    "dump-graph": f"""examples:
  fxq dump-graph {MNIST} --after fuse
  fxq dump-graph {MNIST} --after convert --graphml g.graphml --dot g.dot
""",
    "search-bits": f"""examples:
  fxq search-bits {MNIST} --avg-bits 5 --out-config bits.toml --plot bits.png
  fxq quantize {MNIST} --config bits.toml --out mixed.fxq   # use the widths found
""",
    "report": f"""examples:
  fxq report mnist.fxq {MNIST} --out report/
  (then open report/index.html; report/report.md is the same report as Markdown)
""",
}


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """``--quiet``, ``--debug``, ``--threads``: with their defaults on the top-level parser, and
    without (``SUPPRESS``) on each command's, so that one given before the command is not reset
    by the command's own parser."""
    given = {} if defaults else {"default": argparse.SUPPRESS}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars", **given)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error", **given)
    common.add_argument("--threads", type=int, help="torch / onnxruntime threads (default: torch's)", **given)
    return common


def _version() -> str:
    try:
        return f"fxq {version('fxq')}"
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "fxq (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxq", parents=[_global_options(defaults=True)], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Post-training integer quantization of PyTorch CNNs, as torch.fx graph passes.",
        epilog="`fxq COMMAND --help` shows each command's options and examples.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _global_options(defaults=False)

    def command(name: str, run: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=run, parser=p)
        return p

    p = command("quantize", "quantize", "quantize a trained float model and save it (.fxq)")
    _model(p, required=True), _data(p, required=True), _config(p)
    p.add_argument("--out", type=Path, required=True, help="the .fxq file to write")

    p = command("evaluate", "evaluate", "accuracy, size and latency: float, fxq, deployed")
    p.add_argument("qmodel", type=Path, help="a .fxq file from `fxq quantize`")
    _model(p, required=False), _data(p, required=True)
    _measure(p)

    p = command("explain", "explain", "every integer of the model, or one layer step by step")
    p.add_argument("qmodel", type=Path, help="a .fxq file from `fxq quantize`")
    p.add_argument("layer", nargs="?", help="a conv/linear module path (default: the whole network)")
    _data(p, required=False)
    p.add_argument("--markdown", action="store_true", help="print GitHub Markdown tables")

    p = command("dump-graph", "dump_graph", "the graph after any pass, one row per node")
    _model(p, required=True), _data(p, required=True), _config(p)
    p.add_argument("--after", choices=PASS_NAMES, default=PASS_NAMES[-1], help="the last pass to run")
    p.add_argument("--graphml", type=Path, help="also write the graph as GraphML")
    p.add_argument("--dot", type=Path, help="also write the graph as Graphviz DOT")

    p = command("search-bits", "search_bits", "per-layer weight widths under an average-bits budget")
    _model(p, required=True), _data(p, required=True), _config(p)
    p.add_argument("--avg-bits", type=float, default=5.0, help="the budget: mean weight bits (default 5)")
    p.add_argument("--candidates", type=_widths, default=(2, 3, 4, 5, 6, 8),
                   help="the widths to choose from, comma-separated (default 2,3,4,5,6,8)")
    p.add_argument("--eval", type=int, default=2000, metavar="N", help="test images the curve is measured on")
    p.add_argument("--out-config", type=Path, help="write the chosen widths as a --config TOML file")
    p.add_argument("--plot", type=Path, help="write the accuracy/size curve as a PNG")

    p = command("report", "report", "an HTML + Markdown report with plots")
    p.add_argument("qmodel", type=Path, help="a .fxq file from `fxq quantize`")
    _model(p, required=True), _data(p, required=True), _measure(p)
    p.add_argument("--out", type=Path, required=True, help="the folder to write index.html and report.md to")
    p.add_argument("--sensitivity-images", type=int, default=1000, metavar="N",
                   help="test images of the per-layer sensitivity study (default 1000)")
    p.add_argument("--worst", type=int, default=3, help="layers whose histograms are drawn (default 3)")
    return parser


def _model(p, required: bool) -> None:
    g = p.add_argument_group("the float model")
    g.add_argument("--model", required=required,
                   help="a torchvision classification model (resnet18, mobilenet_v2, ...) or "
                        "PKG.MODULE:FACTORY, a callable in your own file returning the nn.Module")
    g.add_argument("--weights", type=Path, help="its state dict (torch.save(model.state_dict(), path))")
    g.add_argument("--num-classes", type=int, help="for torchvision models (default: from --weights)")


def _data(p, required: bool) -> None:
    g = p.add_argument_group("the data")
    g.add_argument("--data", required=required,
                   help="mnist, fashion-mnist, or a folder DIR/<class>/*.png (DIR/train + DIR/test if present)")
    g.add_argument("--image-size", type=_size, help="resize folder images to H or HxW")
    g.add_argument("--mean", type=_floats, help="folder images: per-channel mean (default ImageNet's for RGB, 0)")
    g.add_argument("--std", type=_floats, help="folder images: per-channel std (default ImageNet's for RGB, 1)")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")


def _config(p) -> None:
    g = p.add_argument_group("quantization (flags override --config)")
    g.add_argument("--config", type=Path, help="a TOML file of QConfig fields and [overrides]")
    g.add_argument("--w-bits", type=int, choices=range(MIN_BITS, MAX_BITS + 1), metavar="B", help="weight bits (2-8)")
    g.add_argument("--a-bits", type=int, choices=[*range(MIN_BITS, MAX_BITS + 1), WIDE_ACT_BITS], metavar="B",
                   help="activation bits (2-8, 16)")
    g.add_argument("--per-tensor", action="store_true", help="one weight scale per layer, not per channel")
    g.add_argument("--weight-range", choices=WEIGHT_RANGES)
    g.add_argument("--act-range", choices=ACT_RANGES)
    g.add_argument("--placement", choices=PLACEMENTS, help="quantize a layer's output before (pre) or after its ReLU")
    g.add_argument("--requantize", choices=REQUANTIZE,
                   help="onnxruntime (default up to 8-bit activations): bit-exact with `fxq evaluate`'s deployed "
                        "row; fixed_point: an int32 multiplier and a shift")
    g.add_argument("--pair-safe", action="store_true",
                   help="7-bit weights beside 8-bit activations: deploys exact on int8 kernels of any CPU")
    g.add_argument("--calib", type=int, default=512, metavar="N", help="calibration images (default 512)")


def _measure(p) -> None:
    g = p.add_argument_group("measuring")
    g.add_argument("--limit", type=int, metavar="N", help="evaluate on the first N test images (default: all)")
    g.add_argument("--runs", type=int, default=20, help="timed runs per latency (median; default 20)")
    g.add_argument("--no-deploy", action="store_true", help="skip the deployed rows")
    g.add_argument("--runtime", action="append", choices=RUNTIMES,
                   help="a deployed row on this runtime (repeat for both; default onnxruntime; openvino: never "
                        "bit-exact, often faster at the batch size)")


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated widths like 2,4,8") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers like 0.5,0.5,0.5") from None


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 224 or 224x224")
    return (int(parts[0]), int(parts[-1]))


def _who(args) -> str:
    """``fxq COMMAND``, and the rank when several run it (torchrun)."""
    from fxq import distributed

    return f"fxq {args.command}" + (f" [rank {distributed.rank()}]" if distributed.active() else "")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fxq: warning: {message}", file=sys.stderr)


def _join_torchrun() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join its process group: gloo on CPUs,
    NCCL when every rank has a GPU. True if this call created the group."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpu else "gloo")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    joined = _join_torchrun()
    try:
        return _run(args)
    finally:
        if joined:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(args) -> int:
    from fxq import distributed
    from fxq.analysis import progress

    progress.enable(not args.quiet and distributed.rank() == 0)
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    shown = warnings.showwarning
    try:
        if not args.debug:
            warnings.showwarning = _show_warning
        getattr(importlib.import_module("fxq.cli.commands"), args.run)(args)
    except UsageError as error:
        if args.debug:
            raise
        args.parser.print_usage(sys.stderr)
        print(f"{_who(args)}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_who(args)}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(f"{_who(args)}: error: {_one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown
    return 0


if __name__ == "__main__":
    sys.exit(main())
