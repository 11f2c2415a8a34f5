"""Run a quantized IR with every FakeQuantize emulated in FP32 arithmetic.

Why: OpenVINO lowers FakeQuantize to real INT8 kernels, whose arithmetic differs by CPU. On
x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) u8 x s8 products are summed pairwise
into saturating int16, which silently clips. The emulated model rounds to exactly the same
grid (clamp, scale, round, rescale) but computes in FP32, so comparing the two separates
quantization-grid error (also in the emulation) from kernel effects (only in the real
kernels). That comparison is how the saturation behind the prototype's accuracy loss was
found; quantize records it for the machine it runs on.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def emulate_fake_quantize(model: ov.Model) -> ov.Model:
    """A copy of `model` whose FakeQuantize nodes are FP32 clamp/round subgraphs (same grid)."""
    emulated = model.clone()
    for node in list(emulated.get_ordered_ops()):
        if node.get_type_name() != "FakeQuantize":
            continue
        x, in_low, in_high, out_low, out_high = (node.input_value(i) for i in range(5))
        steps = ops.constant(np.float32(node.get_attributes()["levels"] - 1))
        unit = ops.clamp(ops.divide(ops.subtract(x, in_low), ops.subtract(in_high, in_low)), 0.0, 1.0)
        rounded = ops.divide(ops.round(ops.multiply(unit, steps), "half_to_even"), steps)
        value = ops.add(ops.multiply(rounded, ops.subtract(out_high, out_low)), out_low)
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(value.output(0))
    emulated.validate_nodes_and_infer_types()
    return emulated
