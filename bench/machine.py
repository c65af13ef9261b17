"""What machine a bench ran on: every result names its CPU (ratios differ by family)."""

from __future__ import annotations


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model, the SIMD features that decide our ratios: avx512, bf16, amx, avx2)."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [x for x in ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma")
                   if x in flags]


def cpu_model() -> str:
    return cpu_info()[0]
