"""The one definition of what the model sees.

Training, export, calibration and the runtime all call these functions, so a
frame on the factory floor is turned into exactly the tensor the model was
trained on. Mean/std normalization is *not* here: it lives inside the model
graph, so the IR takes the tensor this module produces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np


class FrameError(ValueError):
    """A frame that cannot be turned into a model input (wrong shape, dtype, empty)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a frame becomes a model input; stored in every bundle."""

    height: int = 256
    width: int = 256
    color: str = "RGB"  # channel order of the model input
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0  # uint8 -> [0, 1]
    resize: str = "area-down/linear-up"
    # How a frame of another aspect ratio fills the input: stretch (squash, the default), letterbox (scale to
    # fit, pad with black: nothing lost, nothing distorted) or crop (scale to cover, keep the centre).
    fit: str = "stretch"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @classmethod
    def square(cls, size: int, fit: str = "stretch") -> "PreprocessSpec":
        return cls(height=int(size), width=int(size), fit=fit)


FITS = ("stretch", "letterbox", "crop")
PAD_VALUE = 0  # letterbox bars: black, the same for every frame, so the model learns them as normal


@dataclass(frozen=True)
class Placement:
    """Where a (frame_h, frame_w) frame lands in the model input under a uniform fit: scaled to
    (scaled_h, scaled_w) and shifted by (top, left) model pixels (negative when cropped)."""

    scaled_h: int
    scaled_w: int
    top: int
    left: int


def placement(frame_h: int, frame_w: int, spec: PreprocessSpec) -> Placement | None:
    """None for stretch (each axis scaled on its own); otherwise the uniform scale and the offset."""
    if spec.fit == "stretch":
        return None
    if spec.fit not in FITS:
        raise FrameError(f"unknown fit {spec.fit!r}: one of {', '.join(FITS)}")
    ratio = (min if spec.fit == "letterbox" else max)(spec.height / frame_h, spec.width / frame_w)
    scaled_h = max(1, int(round(frame_h * ratio)))
    scaled_w = max(1, int(round(frame_w * ratio)))
    return Placement(scaled_h, scaled_w, (spec.height - scaled_h) // 2, (spec.width - scaled_w) // 2)


def _place(image: np.ndarray, spec: PreprocessSpec, nearest: bool = False, pad=PAD_VALUE) -> np.ndarray:
    """Resize `image` into the model input under the spec's fit (stretch, letterbox or crop)."""
    where = placement(image.shape[0], image.shape[1], spec)
    if where is None:
        return _resize(image, spec.height, spec.width, nearest=nearest)
    scaled = _resize(image, where.scaled_h, where.scaled_w, nearest=nearest)
    if where.top >= 0 and where.left >= 0 and (where.scaled_h, where.scaled_w) != (spec.height, spec.width):
        out = np.full((spec.height, spec.width) + image.shape[2:], pad, dtype=image.dtype)
        out[where.top:where.top + where.scaled_h, where.left:where.left + where.scaled_w] = scaled
        return out
    return scaled[-min(where.top, 0):, -min(where.left, 0):][:spec.height, :spec.width]


def frame_aligned_map(anomaly_map: np.ndarray, frame_h: int, frame_w: int, spec: PreprocessSpec) -> np.ndarray:
    """A model-size map -> a map whose grid covers exactly the frame (at model scale).

    Identity for stretch. Letterbox: the bars are cut off. Crop: the parts of the frame the model never
    saw are added, at the map's minimum (never anomalous). Regions, ROI masks and overlays then
    scale it to the frame as they scale a stretched map.
    """
    where = placement(frame_h, frame_w, spec)
    if where is None:
        return anomaly_map
    if where.top >= 0 and where.left >= 0:
        return np.ascontiguousarray(anomaly_map[where.top:where.top + where.scaled_h,
                                                where.left:where.left + where.scaled_w])
    out = np.full((where.scaled_h, where.scaled_w), anomaly_map.min(), dtype=anomaly_map.dtype)
    top, left = -min(where.top, 0), -min(where.left, 0)
    out[top:top + spec.height, left:left + spec.width] = anomaly_map
    return out


def _resize(image: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    if image.shape[0] == height and image.shape[1] == width:
        return image
    if nearest:
        interpolation = cv2.INTER_NEAREST
    elif image.shape[0] >= height and image.shape[1] >= width:
        interpolation = cv2.INTER_AREA  # anti-aliased shrink
    else:
        interpolation = cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation)


def as_bgr_uint8(frame) -> np.ndarray:
    """Any plausible frame -> contiguous uint8 HxWx3 BGR, or FrameError saying why not.

    Accepted: HxW, HxWx1, HxWx3, HxWx4 of uint8, uint16 (high byte kept) or
    floating point taken as [0, 1] intensities. Everything else (other integer
    types, bool, complex, NaN/inf, fewer than 2x2 pixels) is refused, so a bad
    frame is skipped and counted instead of stopping the stream.
    """
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.size == 0:
        raise FrameError(f"frame is empty (shape {frame.shape})")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise FrameError(f"frame must be HxW, HxWx1, HxWx3 or HxWx4, got shape {frame.shape}")
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        raise FrameError(f"frame is too small: {frame.shape[1]}x{frame.shape[0]}")
    if frame.dtype == np.uint8:
        pass
    elif frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    elif np.issubdtype(frame.dtype, np.floating):
        if not np.all(np.isfinite(frame)):
            raise FrameError("frame contains NaN or infinite values")
        # Floating frames are taken as [0, 1] intensities.
        frame = (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise FrameError(f"unsupported frame dtype {frame.dtype}")
    frame = np.ascontiguousarray(frame)  # views, negative or zero strides: OpenCV wants plain memory
    if frame.ndim == 2:
        try:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        except cv2.error as exc:
            raise FrameError(f"cannot convert the frame: {str(exc).strip().splitlines()[-1]}") from None
    return frame


def resize_for_model(frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Frame (uint8 BGR or grayscale, any size) -> contiguous uint8 HxWx3 BGR at the model's size.

    The geometric half of `preprocess`, and the only part the runtime does on the
    host: the colour order, the float conversion, the scale and the NCHW layout run
    inside the compiled model (`edge_ad.model.inference.with_uint8_input`), which gives the
    same tensor as `preprocess` up to float rounding.
    """
    bgr = as_bgr_uint8(frame)
    if spec.color not in ("RGB", "BGR"):
        raise FrameError(f"unknown color order {spec.color!r}")
    try:
        return np.ascontiguousarray(_place(bgr, spec))
    except cv2.error as exc:
        raise FrameError(f"cannot resize the frame: {str(exc).strip().splitlines()[-1]}") from None


def preprocess(frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Frame (uint8 BGR or grayscale, any size) -> float32 CHW model input in [0, 1]."""
    resized = resize_for_model(frame, spec)
    if spec.color == "RGB":
        resized = resized[:, :, ::-1]
    chw = np.transpose(resized, (2, 0, 1)).astype(np.float32)
    chw *= np.float32(spec.scale)
    return np.ascontiguousarray(chw)


def preprocess_mask(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Ground-truth mask (any size, nonzero = defect) -> uint8 {0,1} HxW at model size."""
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    binary = (mask > 0).astype(np.uint8)
    return _place(binary, spec, nearest=True)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Model-size anomaly map -> frame size, for overlays and region boxes in frame pixels."""
    return _resize(anomaly_map.astype(np.float32), height, width)
