"""A tiny real OpenVINO bundle built without training: dev tooling for tests, benchmarks and the demo.

The model is built with OpenVINO's opset API. It computes
anomaly_map = avg_pool3x3(mean_c |x - 0.5|) and score = max(anomaly_map), so
bright rectangles on a flat gray background are "defects" whose masks are known.
Not runtime code (it does not ship in the edge_ad wheel); tests import it via tests/runtime_helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 64  # model input


def build_bundle(folder: Path, size: int = SIZE, precision: str = "fp32", fit: str = "stretch") -> Path:
    """A real IR + bundle.json. Raw thresholds: image 0.15, pixel 0.25 (defects score ~0.5, background ~0.005).

    `fit` is the bundle's preprocess.fit; letterbox bars (black) score as defects in this model.
    """
    import openvino as ov
    import openvino.opset13 as ops

    from edge_ad.model.bundle import Bundle, ModelInfo, Thresholds, TrainingInfo, write_bundle
    from edge_ad.model.preprocess import PreprocessSpec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = ops.parameter([1, 3, size, size], np.float32, name="image")
    image.output(0).get_tensor().set_names({"image"})
    diff = ops.abs(ops.subtract(image, ops.constant(np.float32(0.5))))
    per_pixel = ops.reduce_mean(diff, ops.constant(np.array([1], dtype=np.int64)), keep_dims=True)
    smooth = ops.avg_pool(per_pixel, [1, 1], [1, 1], [1, 1], [3, 3], exclude_pad=True)
    smooth.set_friendly_name("anomaly_map")
    smooth.output(0).get_tensor().set_names({"anomaly_map"})
    score = ops.reduce_max(smooth, ops.constant(np.array([1, 2, 3], dtype=np.int64)), keep_dims=False)
    score.set_friendly_name("score")
    score.output(0).get_tensor().set_names({"score"})
    model = ov.Model([smooth, score], [image], "test-absdiff")
    ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
    bundle = Bundle(
        model=ModelInfo(algorithm="absdiff", backbone="none", precision=precision),
        preprocess=PreprocessSpec.square(size, fit),
        thresholds=Thresholds(image=0.15, pixel=0.25, image_min=0.0, image_max=0.3, pixel_min=0.0, pixel_max=0.5),
        training=TrainingInfo(category="synthetic", data_root="-", data_fingerprint="-", epochs=None, seed=0,
                              image_size=size, validation_fraction=0.0),
    )
    write_bundle(folder, bundle)
    return folder
