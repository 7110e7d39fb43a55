"""Which CPUs run the AVX2 checks without QEMU: only those whose onnxruntime takes the AVX2 kernels."""
import platform

import pytest

from scripts import emulated_cpu

HASWELL = {"sse4_2", "avx", "avx2", "fma"}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 flags")
@pytest.mark.parametrize("flags, native", [
    (HASWELL, True),
    (HASWELL | {"avx512f", "avx512bw", "avx512_vnni"}, False),
    (HASWELL | {"avx_vnni"}, False),
    (HASWELL | {"amx_int8"}, False),
    ({"sse4_2", "avx"}, False),
    (set(), False),
])
def test_only_a_cpu_with_avx2_and_nothing_newer_runs_natively(monkeypatch, flags, native):
    monkeypatch.setattr(emulated_cpu, "_host_flags", lambda: flags)
    assert emulated_cpu.native() is native
