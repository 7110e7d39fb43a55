"""onnxruntime as an x86 CPU with AVX2 alone runs it, on any x86-64 machine: under QEMU's user-mode
emulation with a Haswell CPU model (``qemu-x86_64 -cpu Haswell``: the same Python and packages,
CPUID without AVX-512 or VNNI), so MLAS takes its AVX2 kernels, saturating U8S8 pair sums
included. Results are the AVX2 kernels' results; timings under emulation mean nothing.

    python -m scripts.emulated_cpu probe          # does this (emulated) CPU's onnxruntime saturate?

Used by tests/test_deploy_real_data.py and scripts/deploy_agreement.py to check that fxq's
deployed model is exact on such a CPU even when the machine running them has VNNI. Debian's
``qemu-user`` package provides the emulator (the Makefile installs it). On a CPU that already is
such a CPU (AVX2 and FMA; no AVX-512, AVX-VNNI or AMX: MLAS takes the same kernels) the same
subprocess runs without the emulator, about a hundred times faster.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# fxq.deployment.runtimes.KEEP_FLOAT, spelled out: the emulated process imports onnxruntime alone, not torch
KEEP_FLOAT = ["WeightBiasQuantization"]

CPU = "Haswell"  # AVX2, FMA, no AVX-512, no VNNI
ROOT = Path(__file__).resolve().parent.parent


def available() -> bool:
    return platform.machine() == "x86_64" and (native() or shutil.which("qemu-x86_64") is not None)


def native() -> bool:
    """This machine's CPU is already the emulated one, as far as onnxruntime's kernel choice goes:
    x86-64 with AVX2 and FMA and none of the extensions MLAS prefers to them."""
    flags = _host_flags()
    newer = [f for f in flags if f.startswith(("avx512", "amx")) or f == "avx_vnni"]
    return platform.machine() == "x86_64" and {"avx2", "fma"} <= flags and not newer


def _host_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: emulate
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


def _emulated(*args: str) -> str:
    emulator = [] if native() else ["qemu-x86_64", "-cpu", CPU]
    command = [*emulator, sys.executable, "-m", "scripts.emulated_cpu", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"under emulation: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout.strip()


def saturates() -> bool:
    """`fxq.deployment.saturation.runtime_saturates` on the emulated AVX2 CPU."""
    return _emulated("probe") == "True"


def run(model_bytes: bytes, inputs: np.ndarray, batch: int = 500) -> np.ndarray:
    """The ONNX model's first output on ``inputs`` (float32, batch first), run by onnxruntime on
    the emulated AVX2 CPU, ``batch`` rows at a time."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "model.onnx").write_bytes(model_bytes)
        np.save(folder / "inputs.npy", inputs.astype(np.float32))
        _emulated("run", str(folder), str(batch))
        return np.load(folder / "outputs.npy")


def _run_here(folder: Path, batch: int) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=KEEP_FLOAT)
    inputs = np.load(folder / "inputs.npy")
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)]
    np.save(folder / "outputs.npy", np.concatenate(outputs))


def main() -> None:
    if sys.argv[1] == "probe":
        from fxq.deployment import saturation
        print(saturation.runtime_saturates())
    elif sys.argv[1] == "run":
        _run_here(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
