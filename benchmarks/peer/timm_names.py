"""Our backbones' parameter names and taps -> timm's, so anomalib's models get OUR ImageNet weights.

Why: anomalib builds its feature extractors with timm (`mobilenetv2_100`, `tf_efficientnet_lite0`), whose
pretrained weights would come from a model hub that machines here cannot reach. The architectures are the
same as ours, only the module names differ, so the peer benchmark renames our state dict (torchvision's
mobilenet_v2 names, efficientnet_lite_pytorch's names) onto timm's and loads it. Pure string work (no
torch, no timm) so it is testable in our venv; the worker checks the result against a real timm model
(every tensor assigned, shapes equal, features equal at the taps).
"""

from __future__ import annotations

import re

# timm's EfficientNet-family models: stages of blocks; the first stage of both is a DepthwiseSeparableConv
# (no expansion), the others InvertedResidual (expand 1x1, depthwise, project 1x1).
MOBILENET_V2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)  # torchvision features.1 .. features.17
EFFICIENTNET_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # efficientnet_lite_pytorch _blocks.0 .. _blocks.15

TIMM_MODEL = {"mobilenet_v2": "mobilenetv2_100", "efficientnet_lite0": "tf_efficientnet_lite0"}

# Within one block: (our sub-module) -> timm's, for blocks without and with an expansion conv.
_TV_NO_EXPANSION = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_EXPANSION = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                 "conv.2": "conv_pwl", "conv.3": "bn3"}
_LITE_NO_EXPANSION = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_EXPANSION = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}


class NameMappingError(ValueError):
    """A key or tap that has no timm counterpart: the weights would not be ours."""


def _stage_of(block: int, depths: tuple[int, ...]) -> tuple[int, int]:
    """Flat block index (0-based) -> (stage, index within the stage)."""
    start = 0
    for stage, depth in enumerate(depths):
        if block < start + depth:
            return stage, block - start
        start += depth
    raise NameMappingError(f"block {block} is beyond the {start} blocks of this architecture")


def _rename_block(prefix: str, rest: str, table: dict[str, str]) -> str:
    for ours, theirs in sorted(table.items(), key=lambda item: -len(item[0])):  # longest match first
        if rest.startswith(ours + "."):
            return f"{prefix}.{theirs}{rest[len(ours):]}"
    raise NameMappingError(f"no timm name for block parameter {rest!r}")


def torchvision_mobilenet_v2_to_timm(key: str) -> str:
    """torchvision mobilenet_v2 key (e.g. features.3.conv.1.0.weight) -> timm mobilenetv2_100 key."""
    if key.startswith("features.0.0."):
        return "conv_stem." + key.removeprefix("features.0.0.")
    if key.startswith("features.0.1."):
        return "bn1." + key.removeprefix("features.0.1.")
    if key.startswith("features.18.0."):
        return "conv_head." + key.removeprefix("features.18.0.")
    if key.startswith("features.18.1."):
        return "bn2." + key.removeprefix("features.18.1.")
    if key.startswith("classifier.1."):
        return "classifier." + key.removeprefix("classifier.1.")
    match = re.fullmatch(r"features\.(\d+)\.(conv\..+)", key)
    if not match:
        raise NameMappingError(f"no timm name for torchvision mobilenet_v2 key {key!r}")
    block = int(match.group(1)) - 1  # features.1 is the first block
    stage, index = _stage_of(block, MOBILENET_V2_STAGE_DEPTHS)
    return _rename_block(f"blocks.{stage}.{index}", match.group(2), _TV_NO_EXPANSION if stage == 0 else _TV_EXPANSION)


def efficientnet_lite_to_timm(key: str) -> str:
    """efficientnet_lite_pytorch key (e.g. _blocks.4._expand_conv.weight) -> timm tf_efficientnet_lite0 key."""
    fixed = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
             "_fc.": "classifier."}
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    match = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
    if not match:
        raise NameMappingError(f"no timm name for efficientnet_lite key {key!r}")
    stage, index = _stage_of(int(match.group(1)), EFFICIENTNET_LITE0_STAGE_DEPTHS)
    return _rename_block(f"blocks.{stage}.{index}", match.group(2),
                         _LITE_NO_EXPANSION if stage == 0 else _LITE_EXPANSION)


def rename_state_dict_keys(backbone: str, keys) -> dict[str, str]:
    """{our key: timm key} for every key; an unknown key or two keys landing on one name is an error."""
    rename = {"mobilenet_v2": torchvision_mobilenet_v2_to_timm, "efficientnet_lite0": efficientnet_lite_to_timm}.get(backbone)
    if rename is None:
        raise NameMappingError(f"no timm mapping for backbone {backbone!r}; known: {', '.join(TIMM_MODEL)}")
    mapping = {key: rename(key) for key in keys}
    if len(set(mapping.values())) != len(mapping):
        raise NameMappingError(f"{backbone}: two of our keys map onto the same timm key")
    return mapping


def timm_tap(backbone: str, tap: str) -> str:
    """Our tap (module whose output is a feature map) -> the timm stage whose output is the same tensor.

    timm's features_only taps whole stages (`blocks.N`), so our tap must be the last block of a stage.
    """
    if backbone == "mobilenet_v2":
        match = re.fullmatch(r"features\.(\d+)", tap)
        depths, block = MOBILENET_V2_STAGE_DEPTHS, (int(match.group(1)) - 1 if match else None)
    elif backbone == "efficientnet_lite0":
        match = re.fullmatch(r"_blocks\.(\d+)", tap)
        depths, block = EFFICIENTNET_LITE0_STAGE_DEPTHS, (int(match.group(1)) if match else None)
    else:
        raise NameMappingError(f"no timm mapping for backbone {backbone!r}; known: {', '.join(TIMM_MODEL)}")
    if block is None or block < 0:
        raise NameMappingError(f"{backbone}: tap {tap!r} is not a block")
    stage, index = _stage_of(block, depths)
    if index != depths[stage] - 1:
        raise NameMappingError(f"{backbone}: tap {tap!r} is inside stage {stage}, timm can only tap stage ends")
    return f"blocks.{stage}"
