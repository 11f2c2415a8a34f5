"""Which inference precision the runtime compiles a bundle with.

On CPUs with bf16 (AVX512-BF16, AMX) an FP32 IR runs faster in bf16, but its raw scores move
and the bundle's thresholds were set on f32 ones. So `auto` (the default) runs bf16 only where
both hold: this CPU reports BF16 in OPTIMIZATION_CAPABILITIES, and the bundle carries a bf16
check that passed the INT8 tolerances at export (bundle.json `precision_checks`, made by
deploy.precision_check). Anything else runs f32; an operator can pin any precision.
Other devices (GPU, NPU...) keep their own default under `auto`.
"""

from __future__ import annotations

import openvino as ov

from edge_ad.model.bundle import Bundle

BF16 = "bf16"


def is_cpu(device: str) -> bool:
    return device.split(".")[0].strip().upper() == "CPU"


def cpu_capabilities(core: ov.Core) -> list[str]:
    try:
        return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except RuntimeError:  # no CPU plugin
        return []


def cpu_has_bf16(core: ov.Core) -> bool:
    return "BF16" in cpu_capabilities(core)


def choose_precision(requested: str | None, device: str, bundle: Bundle, core: ov.Core) -> tuple[str, str]:
    """(precision for compile_options, why): `auto`/None -> bf16 if this CPU has it and the bundle verified it."""
    if requested not in (None, "auto"):
        return requested, "pinned by --inference-precision"
    if not is_cpu(device):
        return "auto", f"the {device} device's own choice"
    check = bundle.precision_checks.get(BF16)
    if check is None:
        return "f32", "the bundle has no bf16 check (exported without one): f32, the precision its thresholds were set in"
    if not check.verified:
        return "f32", f"bf16 not verified by the bundle ({check.reason})"
    if not cpu_has_bf16(core):
        return "f32", "the bundle verified bf16 but this CPU has no bf16 support"
    return BF16, f"this CPU has bf16 and the bundle verified it ({check.reason})"
