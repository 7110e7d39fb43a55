"""The subcommands: each takes the parsed arguments, prints its result, raises on failure."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tabulate import tabulate

import fxq
from fxq import distributed
from fxq.analysis.comparison import integer_layers
from fxq.cli import inputs
from fxq.cli.measurements import AGREEMENT_NOTE, check_classes, float_problems, measure_rows
from fxq.config import QConfig
from fxq.graphs import dump


def say(*lines) -> None:
    """Print, on one rank only when the command runs on several (torchrun)."""
    if distributed.rank() == 0:
        print(*lines)


def _model_and_data(args):
    model = inputs.build_model(args.model, args.weights, args.num_classes)
    if args.weights is None:
        say(f"note: no --weights: {args.model} runs with the weights its constructor gives it")
    return model, _data(args, inputs.input_channels(model))


def _measured(args, qmodel, model, data):
    """The float / fxq / deployed table, after checking the data and the float reference."""
    check_classes(data, qmodel)
    random_weights = model is not None and args.weights is None and not inputs.is_factory(args.model)
    problems = [] if model is None else float_problems(model, qmodel, data.example(1), random_weights)
    runtimes = [] if args.no_deploy else list(dict.fromkeys(args.runtime or ["onnxruntime"]))
    return measure_rows(qmodel, data, model, args.limit, args.runs, runtimes, args.threads, problems)


def _say_problems(measured) -> None:
    if measured.reference_problems:
        say("(the float row is no reference, so nothing is compared with it, marked —: "
            + "; ".join(measured.reference_problems) + ")")


def _data(args, channels: int) -> inputs.Data:
    data = inputs.load_data(args.data, channels, args.image_size, args.mean, args.std, args.batch_size)
    if data.note:
        say(f"note: {data.note}")
    return data


def _config(args) -> tuple[QConfig, dict]:
    values, overrides = inputs.read_config(args.config) if args.config else ({}, {})
    flags = {"weight_bits": args.w_bits, "act_bits": args.a_bits, "weight_range": args.weight_range,
             "act_range": args.act_range, "placement": args.placement, "requantize": args.requantize,
             "per_channel": False if args.per_tensor else None, "pair_safe": True if args.pair_safe else None}
    values.update({k: v for k, v in flags.items() if v is not None})
    return inputs.make_config(values, overrides)


def _load(path: Path):
    if not path.is_file():
        raise inputs.UsageError(f"{path}: no such file; write one with `fxq quantize ... --out {path}`")
    try:
        return fxq.load(path)
    except fxq.InvalidModelFile as error:  # a file the argument names that cannot be used
        raise inputs.UsageError(str(error)) from None


def describe(config: QConfig) -> str:
    """``W8A8 per-channel, weights minmax, activations minmax, ...`` (every field, in short)."""
    granularity = "per-channel" if config.per_channel else "per-tensor"
    extras = [name for name, on in (("CLE", config.cross_layer_equalization),
                                    ("bias correction", config.bias_correction),
                                    ("first/last 8-bit", config.keep_first_last_8bit),
                                    ("learned rounding and ranges", config.reconstruct),
                                    ("pair-safe 7-bit weights", config.pair_safe)) if on]
    return (f"W{config.weight_bits}A{config.act_bits} {granularity}, weights {config.weight_range}, "
            f"activations {config.act_range}, placement {config.placement}, requantize {config.requantize}"
            + "".join(f", {e}" for e in extras))


def quantize(args) -> None:
    model, data = _model_and_data(args)
    config, overrides = _config(args)
    start = time.perf_counter()
    qmodel = fxq.quantize(model, data.calibration(args.calib), config, overrides=overrides)
    seconds = time.perf_counter() - start
    say(f"quantized {args.model} in {seconds:.1f} s on {min(args.calib, len(data.calibration_split))} "
        f"{data.name} images: {describe(config)}")
    if distributed.rank() == 0:  # every rank holds the same model
        say(fxq.explain(qmodel).summary)
        fxq.save(qmodel, args.out)
        say(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


def evaluate(args) -> None:
    qmodel = _load(args.qmodel)
    model = inputs.build_model(args.model, args.weights, args.num_classes) if args.model else None
    data = _data(args, inputs.input_channels(qmodel))
    measured = _measured(args, qmodel, model, data)
    say(tabulate(measured.rows, headers="keys", tablefmt="simple"))
    _say_problems(measured)
    if "accuracy %" not in measured.rows[0]:
        say(f"({AGREEMENT_NOTE})")
    if model is None:
        say("(give --model and --weights for the float row)")


def explain(args) -> None:
    qmodel = _load(args.qmodel)
    if args.layer is not None and args.layer not in integer_layers(qmodel):
        raise inputs.UsageError(f"{args.layer!r} is not a conv/linear layer of {args.qmodel}; "
                                f"choose one of {list(integer_layers(qmodel))}")
    batch = _data(args, inputs.input_channels(qmodel)).example(args.batch_size) if args.data else None
    explanation = fxq.explain(qmodel, args.layer, batch)
    say(explanation.to_markdown() if args.markdown else explanation)
    if args.layer is not None and batch is None:
        say("(give --data to see the observed ranges and check the formula in int64)")


def dump_graph(args) -> None:
    model, data = _model_and_data(args)
    config, overrides = _config(args)
    passes = fxq.PASSES[:[p.__name__ for p in fxq.PASSES].index(args.after) + 1]
    gm = fxq.quantize(model, data.calibration(args.calib), config, passes=passes, overrides=overrides)
    table = dump.rows(gm, data.example(2))
    say(f"{args.model} after {args.after} ({len(table)} nodes)")
    say(tabulate([asdict(r) for r in table], headers="keys", tablefmt="simple"))
    graph = dump.to_networkx(gm, table)
    if args.graphml and distributed.rank() == 0:
        import networkx as nx
        nx.write_graphml(graph, args.graphml)
        say(f"wrote {args.graphml}")
    if args.dot and distributed.rank() == 0:
        args.dot.write_text(dump.to_dot(graph))
        say(f"wrote {args.dot}")


def search_bits(args) -> None:
    model, data = _model_and_data(args)
    config, overrides = _config(args)
    if overrides:
        raise inputs.UsageError("search-bits chooses every layer's weight width itself: remove [overrides] "
                                "from --config")
    result = fxq.search_bits(model, data.calibration(args.calib), args.avg_bits, config, args.candidates,
                             eval_loader=data.evaluation(args.eval), progress=True)
    say(result.to_markdown())
    say(f"chosen for {args.avg_bits:g} bits: average {result.avg_weight_bits:.2f} bits; "
          + ", ".join(f"{name} {bits}" for name, bits in result.bits.items()))
    if args.out_config and distributed.rank() == 0:
        inputs.write_config(args.out_config, result.config, result.overrides)
        say(f"wrote {args.out_config} (use it: fxq quantize ... --config {args.out_config})")
    if args.plot and distributed.rank() == 0:
        result.plot(str(args.plot))
        say(f"wrote {args.plot}")


def report(args) -> None:
    from fxq.analysis.report import write_report

    qmodel = _load(args.qmodel)
    model, data = _model_and_data(args)
    measured = _measured(args, qmodel, model, data)
    _say_problems(measured)
    index = write_report(args.out, qmodel, model, data, measured, args.sensitivity_images, args.worst,
                         source=str(args.qmodel))
    say(f"wrote {index} and {args.out / 'report.md'}")
