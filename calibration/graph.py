"""Where the feature extractor ends and the anomaly head begins, found in the OpenVINO graph itself.

Why: an anomaly map is a *small difference* of features (STFPM: teacher vs student;
DFM: features vs their PCA reconstruction). Quantizing that difference, the per-location
norms, the upsampling or the product of maps wipes the signal out (the prototype's
plain PTQ fell to image AUROC 0.5). So the head must stay FP32, and the quantizer
needs the head's node names for `nncf.IgnoredScope`.

The IR's convolution nodes carry generated names (BatchNorm folding renames them),
so names cannot tell teacher, student and head apart. The topology can: the feature
extractor is every convolution plus every node a convolution depends on; whatever
lies after the last convolution of every path (L2 norms, subtraction, PCA matmuls,
the maps' resize, the product of maps, ReduceMax) is head. This holds for any CNN backbone
followed by a convolution-free head, which is what STFPM and DFM are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import openvino as ov

CONV_TYPES = frozenset({"Convolution", "GroupConvolution"})
_NOT_OPS = frozenset({"Constant", "Parameter", "Result"})


class GraphError(RuntimeError):
    """An IR whose structure this quantizer does not understand."""


@dataclass
class GraphParts:
    """Friendly names of the parts of an edge-ad IR that quantization treats differently."""

    head: list[str]  # after the last convolution of every path: kept FP32
    taps: list[str]  # feature-extractor nodes whose outputs feed the head (the tap tensors)
    tap_convs: list[list[str]] = field(default_factory=list)  # per depth: convolutions k steps before the taps
    convolutions: int = 0  # all convolutions of the extractor(s)
    first_convs: list[str] = field(default_factory=list)  # convolutions fed (almost) directly by the input


def _producers(node: ov.Node) -> list[ov.Node]:
    return [port.get_source_output().get_node() for port in node.inputs()]


def _consumers(node: ov.Node) -> list[ov.Node]:
    return [target.get_node() for output in node.outputs() for target in output.get_target_inputs()]


def _conv_ancestors(start: list[ov.Node], depth: int) -> list[list[ov.Node]]:
    """Per depth 1..depth: the convolutions met when walking back from `start`, stopping at each conv."""
    levels: list[list[ov.Node]] = []
    frontier = list(start)
    seen: set[str] = set()
    for _ in range(depth):
        found: dict[str, ov.Node] = {}
        stack = [p for node in frontier for p in _producers(node)]
        while stack:
            node = stack.pop()
            name = node.get_friendly_name()
            if name in seen:
                continue
            seen.add(name)
            if node.get_type_name() in CONV_TYPES:
                found[name] = node
            elif node.get_type_name() not in ("Constant", "Parameter"):
                stack.extend(_producers(node))
        if not found:
            break
        levels.append(sorted(found.values(), key=lambda n: n.get_friendly_name()))
        frontier = levels[-1]
    return levels


def _is_map_blur(node: ov.Node) -> bool:
    """The anomaly map's Gaussian blur (training.models.image_score): a 1->1 channel convolution with
    constant weights. It belongs to the head, which must stay FP32, not to the feature extractor."""
    if node.get_type_name() != "Convolution":
        return False
    weights = node.input_value(1).get_node()
    shape = list(node.get_input_partial_shape(1).to_shape()) if node.get_input_partial_shape(1).is_static else []
    return weights.get_type_name() == "Constant" and len(shape) == 4 and shape[0] == 1 and shape[1] == 1


def split_graph(model: ov.Model, tap_conv_depth: int = 3) -> GraphParts:
    """Split an IR into feature extractor and head (see module docstring)."""
    ops = list(model.get_ordered_ops())
    convs = [op for op in ops if op.get_type_name() in CONV_TYPES and not _is_map_blur(op)]
    if not convs:
        raise GraphError("the IR has no convolutions: not a CNN feature extractor this quantizer knows")
    extractor: set[str] = set()
    stack = list(convs)
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in extractor:
            continue
        extractor.add(name)
        stack.extend(_producers(node))

    head_nodes = [
        op for op in ops
        if op.get_friendly_name() not in extractor and op.get_type_name() not in _NOT_OPS
    ]
    if not head_nodes:
        raise GraphError("found no operations after the last convolution: the anomaly head is missing")
    head_names = {op.get_friendly_name() for op in head_nodes}
    taps: dict[str, ov.Node] = {}
    for op in head_nodes:
        for producer in _producers(op):
            if producer.get_friendly_name() in extractor and producer.get_type_name() not in ("Constant", "Parameter"):
                taps[producer.get_friendly_name()] = producer
    # A tap whose last block ends in a residual Add lands in the head (nothing conv-like follows it);
    # walking back from the head's entry points finds its convolutions all the same.
    entry = [op for op in head_nodes if any(p.get_friendly_name() in extractor for p in _producers(op))]
    levels = _conv_ancestors(entry, tap_conv_depth)

    input_names = {p.get_friendly_name() for p in model.get_parameters()}
    first = []
    for conv in convs:
        # first convolutions: only passive / elementwise nodes between the model input and them
        stack, reaches_input, hops = [conv], False, 0
        while stack and hops < 64:
            node = stack.pop()
            hops += 1
            for producer in _producers(node):
                if producer.get_friendly_name() in input_names:
                    reaches_input = True
                elif producer.get_type_name() not in CONV_TYPES and producer.get_type_name() != "Constant":
                    stack.append(producer)
        if reaches_input:
            first.append(conv.get_friendly_name())
    return GraphParts(
        head=sorted(head_names),
        taps=sorted(taps),
        tap_convs=[[n.get_friendly_name() for n in level] for level in levels],
        convolutions=len(convs),
        first_convs=sorted(first),
    )
