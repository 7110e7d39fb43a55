"""Latency of every way to run a model here, and how long quantizing takes.

    python -m scripts.bench                   # results/bench.json + the README tables
    python -m scripts.bench --shapes mnist    # only the 28×28 MNIST ResNet-18

Shapes: the committed suite models (MNIST and Fashion-MNIST ResNet-18s, the inception-style net,
MobileNetV2 and MobileNetV3-small on Fashion-MNIST; 1×28×28; batches 1, 32, 256; full-test accuracy) and
torchvision ResNet-18 and MobileNetV2 at 3×224×224 (random weights, batch norm settled and
everything calibrated on structured random images; batches 1 and 32). Two threads everywhere.

Latency rows: fp32 torch, fp32 onnxruntime (torch.onnx export), torch.ao FX x86 int8 and
onnxruntime's own ``quantize_static`` (per-channel QDQ int8) as references; where OpenVINO is
installed, fp32 OpenVINO (float32 asked for) and fxq deployed on OpenVINO, and where NNCF is too
(``pip install nncf``: a peer, not a dependency), NNCF's post-training int8 on OpenVINO (its defaults,
W8A8, the same calibration images) as a reference, and ``nncf.quantize``'s time beside fxq's; fxq's integer executor
and fxq deployed (`fxq.deploy`), both of the model quantized with the defaults (onnxruntime's
arithmetic, so the two agree bit for bit), and fxq deployed with
``placement="post"`` too: there each ReLU is the conv's own clamp (z = 0), where the default
"pre" placement runs it as a separate ``Clip`` on the integers; fxq deployed with weights "exact"
(U8U8 where a U8S8 kernel without VNNI could saturate: what `fxq.deploy` picks on such a CPU) and
of the model quantized with ``pair_safe=True`` (7-bit weights: U8S8 exact on every CPU). The
"inside" column says which accumulator backends the executor's layers chose here (`fxq.integers.gemm`) and
each deployed model's weight format; the table's first line names the CPU, its torch capability
and whether its onnxruntime's U8S8 kernels saturate. Each cell is the median of at
least ``RUNS`` runs (more for fast cells, ``MIN_SECONDS`` of runs in all) after two warm-ups, and
the median of ``ROUNDS`` such medians taken in turn with every other runner (the reference
executor: one round), all in the same process; "× ORT int8" divides by onnxruntime's own int8
model in the same run.

Quantize rows: wall time of ``fxq.quantize`` at W8A8 with each activation range rule against
torch.ao's ``prepare_fx`` + calibration + ``convert_fx`` (its x86 default: histogram observers),
on ``CALIBRATION`` images; every method once to warm up, then ``REPEATS`` alternating runs, median.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import io
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import fxq
from fxq.analysis.measure import latency_ms
from fxq.deployment import saturation
from fxq.deployment.deployed import Deployed
from fxq.ops.layers import QLayer
from scripts import data, models, readme, zoo
from scripts.evaluate import torch_ao_x86

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "bench.json"
RUNS, THREADS, MIN_SECONDS, ROUNDS = 10, 2, 1.0, 3
SLOW = "fxq executor"  # timed in the first round only: seconds per call at 224×224
CALIBRATION, REPEATS = 512, 3
ACT_RANGES = ("minmax", "percentile", "mse", "entropy")
# the committed suite models at 28×28 (full-test accuracy), and torchvision's at 224×224 (random weights)
SUITE = ("mnist", "fashion", "fashion_inception", "fashion_mobilenet_v2", "fashion_mobilenet_v3")
SHAPES = {**{name: (1, 32, 256) for name in SUITE}, "resnet18_224": (1, 32), "mobilenet_v2_224": (1, 32)}


class Session(torch.nn.Module):
    """An onnxruntime session as a module (float in, float out)."""

    def __init__(self, model_bytes: bytes):
        super().__init__()
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.model_bytes = model_bytes

    def forward(self, x):
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])


class OpenVINOModel(torch.nn.Module):
    """An OpenVINO compiled model as a module (float in, float out), ``THREADS`` threads; ``config`` adds
    the plugin's settings (the fp32 row asks for float32, where this CPU's default would be bfloat16)."""

    def __init__(self, model, config: dict | None = None, model_bytes: bytes = b""):
        super().__init__()
        import openvino as ov
        core = ov.Core()
        model = core.read_model(io.BytesIO(model)) if isinstance(model, bytes) else model
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": THREADS, **(config or {})})
        self.request, self.model_bytes = self.compiled.create_infer_request(), model_bytes

    def forward(self, x):
        return torch.from_numpy(self.request.infer({0: x.numpy()})[0].copy())


def nncf_int8(float_bytes: bytes, calib: list):
    """NNCF's post-training quantization (its defaults: W8A8) of the float ONNX graph read by OpenVINO."""
    import nncf
    import openvino as ov
    model = ov.Core().read_model(io.BytesIO(float_bytes))
    return nncf.quantize(model, nncf.Dataset([b.numpy() for b in calib]), subset_size=len(calib))  # every batch


def saved_openvino(model) -> bytes:
    """The weights file OpenVINO saves for ``model`` (its size is the model's)."""
    import openvino as ov
    with tempfile.TemporaryDirectory() as folder:
        ov.save_model(model, str(Path(folder) / "model.xml"))
        return (Path(folder) / "model.bin").read_bytes()


def peers_on_openvino(float_bytes: bytes, calib: list) -> dict:
    """The OpenVINO rows where OpenVINO (and for the peer's int8 row, NNCF) is installed: fp32 and NNCF's int8."""
    import importlib.util
    rows = {}
    if importlib.util.find_spec("openvino") is not None:
        rows["fp32 openvino"] = OpenVINOModel(float_bytes, {"INFERENCE_PRECISION_HINT": "f32"}, float_bytes)
    if importlib.util.find_spec("nncf") is not None:
        quantized = nncf_int8(float_bytes, calib)
        rows["NNCF → OpenVINO int8 (reference)"] = OpenVINOModel(quantized, model_bytes=saved_openvino(quantized))
    return rows


def float_onnx(model, example) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
    return buffer.getvalue()


def ort_int8(model_bytes: bytes, calib: list) -> bytes:
    """onnxruntime's own static quantization: per-channel QDQ int8 (reference only)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": b.numpy()} for b in calib])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(model_bytes)
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return target.read_bytes()


def setup(shape: str):
    """(float model, calibration batches, example input, test split or None)."""
    if shape in SUITE:
        dataset = models.RECIPES[shape].dataset
        model = models.load_trained(shape)
        calib = [images for images, _ in data.calibration_batches(dataset, CALIBRATION)]
        return model, calib, calib[0][:1], data.load(dataset, "test")
    zoo.SIZE = 224
    model = zoo.build(shape.removesuffix("_224"))
    calib = list(zoo.images(CALIBRATION, 1).split(32))
    return model, calib, calib[0][:1], None


def quantize_seconds(shape: str, model, calib: list) -> list[dict]:
    """Wall time of each way to quantize ``model`` on ``calib``, medians of alternating runs."""
    methods = {f"fxq.quantize, act_range={r}": (lambda r=r: fxq.quantize(model, calib, fxq.QConfig(act_range=r)))
               for r in ACT_RANGES}
    if importlib.util.find_spec("nncf") is not None:
        float_bytes = float_onnx(model, calib[0][:1])
        methods["nncf.quantize (OpenVINO model of the float ONNX)"] = lambda: nncf_int8(float_bytes, calib)
    methods["torch.ao prepare_fx + calibrate + convert_fx (x86)"] = lambda: torch_ao_x86(
        model, [(b, None) for b in calib])
    times = {name: [] for name in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for repeat in range(REPEATS + 1):
            for name, make in methods.items():
                start = time.perf_counter()
                make()
                if repeat:  # the first round warms up imports and kernels for everyone
                    times[name].append(time.perf_counter() - start)
    reference = statistics.median(times[next(reversed(times))])
    return [{"shape": shape, "method": name, "images": sum(len(b) for b in calib),
             "seconds": statistics.median(t), "x_torch_ao": statistics.median(t) / reference}
            for name, t in times.items()]


def size_mb(module) -> float:
    if hasattr(module, "model_bytes"):
        return len(module.model_bytes) / 1e6
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell() / 1e6


def bench(shape: str) -> list[dict]:
    model, calib, example, test = setup(shape)
    float_bytes = float_onnx(model, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxq.quantize(model, calib)
        fused = fxq.quantize(model, calib, fxq.QConfig(placement="post"))
        pair_safe = fxq.quantize(model, calib, fxq.QConfig(pair_safe=True))
        runners = {"fp32 torch": model, "fp32 onnxruntime": Session(float_bytes),
                   "torch.ao x86 int8 (reference)": torch_ao_x86(model, [(b, None) for b in calib]),
                   "onnxruntime quantize_static int8 (reference)": Session(ort_int8(float_bytes, calib)),
                   "fxq executor": qmodel, "fxq deployed": fxq.deploy(qmodel, threads=THREADS),
                   "fxq deployed, placement post": fxq.deploy(fused, threads=THREADS),
                   "fxq deployed, weights exact on any CPU": fxq.deploy(qmodel, threads=THREADS, weights="exact"),
                   "fxq deployed, pair_safe (7-bit weights)": fxq.deploy(pair_safe, threads=THREADS),
                   **peers_on_openvino(float_bytes, calib)}
        if "fp32 openvino" in runners:
            runners["fxq deployed, openvino (not bit-exact)"] = fxq.deploy(qmodel, threads=THREADS,
                                                                          runtime="openvino")
    rows = [{"shape": shape, "runner": name, "size_mb": size_mb(runner), "how": _how(runner)}
            for name, runner in runners.items()]
    for batch in SHAPES[shape]:
        x = torch.cat([calib[0]] * (batch // len(calib[0]) + 1))[:batch]
        cells = {name: [] for name in runners}
        for _ in range(ROUNDS):  # interleaved, so a slow stretch of the machine hits every runner
            for name, runner in runners.items():
                if name != SLOW or not cells[name]:
                    cells[name].append(latency_ms(runner, x, RUNS, MIN_SECONDS, 50 * RUNS, warmup=2))
        for row in rows:
            row[f"ms_batch{batch}"] = statistics.median(cells[row["runner"]])
    for row, runner in zip(rows, runners.values()):
        if test is not None:
            with torch.no_grad():
                predictions = torch.cat([runner(x).argmax(1) for x in test.images.split(500)])
            row["accuracy"] = 100 * float((predictions == test.labels).float().mean())
        print(row, flush=True)
    reference = next(r for r in rows if r["runner"].startswith("onnxruntime quantize_static"))
    for row in rows:
        for batch in SHAPES[shape]:
            row[f"x_ort_int8_batch{batch}"] = row[f"ms_batch{batch}"] / reference[f"ms_batch{batch}"]
    return rows


def _how(runner) -> str:
    """What runs inside: the executor's accumulator backends, a deployed model's weight format."""
    if isinstance(runner, Deployed):
        return f"weights {runner.weight_format}" + ("" if runner.bit_exact else ", not bit-exact")
    layers = [m for m in runner.modules() if isinstance(m, QLayer)]
    if not layers:
        return ""
    return "accumulators: " + ", ".join(f"{b} ×{n}" for b, n in
                                        collections.Counter(str(m.backend) for m in layers).items())


def table(rows: list[dict], machine: dict) -> str:
    out = [f"{', '.join(machine['shapes'])} measured on {machine['cpu']} (torch capability "
           f"{machine['capability']}), onnxruntime {machine['onnxruntime']} with "
           f"{'saturating' if machine['onnxruntime_saturates'] else 'exact'} U8S8 kernels, {THREADS} threads; "
           "other shapes' rows come from earlier runs of this script (results/bench.json's history)."]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        batches = SHAPES[shape]
        headers = ["runner", *(f"ms, batch {b}" for b in batches), *(f"× ORT int8, b{b}" for b in batches), "MB",
                   "inside"]
        if shape in SUITE:
            headers.append("test acc %")
        body = []
        for r in (r for r in rows if r["shape"] == shape):
            line = [r["runner"], *(f"{r[f'ms_batch{b}']:.2f}" for b in batches),
                    *(f"{r[f'x_ort_int8_batch{b}']:.2f}" for b in batches), f"{r['size_mb']:.1f}",
                    r.get("how", "")]
            if shape in SUITE:
                line.append(f"{r['accuracy']:.2f}")
            body.append(line)
        out.append(f"**{shape}**\n\n" + tabulate(body, headers=headers, tablefmt="github"))
    return "\n\n".join(out)


def quantize_table(rows: list[dict]) -> str:
    body = [[r["shape"], r["method"], r["images"], f"{r['seconds']:.2f}", f"{r['x_torch_ao']:.2f}"] for r in rows]
    return tabulate(body, headers=["shape", "method", "images", "seconds", "× torch.ao"], tablefmt="github")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old = old if isinstance(old, dict) else {}  # a file from before the quantize rows: measured again
    results = {kind: [r for r in old.get(kind, []) if r["shape"] not in args.shapes]
               for kind in ("latency", "quantize")}
    for shape in args.shapes:
        model, calib, _, _ = setup(shape)
        results["quantize"] += quantize_seconds(shape, model, calib)
        results["latency"] += bench(shape)
    for rows in results.values():
        rows.sort(key=lambda r: list(SHAPES).index(r["shape"]))
    RESULTS.parent.mkdir(exist_ok=True)
    import onnxruntime
    machine = {**readme.machine(THREADS), "onnxruntime": onnxruntime.__version__,
               "onnxruntime_saturates": saturation.runtime_saturates(), "shapes": args.shapes}
    RESULTS.write_text(json.dumps({"command": "python -m scripts.bench", "machine": machine, **results}, indent=1))
    latency, quantize = table(results["latency"], machine), quantize_table(results["quantize"])
    readme.write("bench", latency)
    readme.write("bench-quantize", quantize)
    print(latency, quantize, sep="\n\n")


if __name__ == "__main__":
    main()
