"""Data sources: the images:DIR reader, sample limits, and the reader protocol."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnxfgq.calibration.images import ImageOptions
from onnxfgq.calibration.sources import DataSourceError, open_source
from onnxfgq.static import LimitedReader

PIL = pytest.importorskip("PIL.Image")


def _model(shape):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    pixels = []
    for i, size in enumerate([(10, 12), (6, 6), (10, 12)]):
        arr = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        pixels.append(arr)
        PIL.fromarray(arr, "RGB").save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path, pixels


def test_images_nchw_resized_and_normalised(image_dir):
    folder, pixels = image_dir
    reader = open_source(f"images:{folder}?mean=0.5&std=0.25", _model(["N", 3, 10, 12]), batch_size=2)
    first = reader.get_next()["x"]
    assert first.shape == (2, 3, 10, 12) and first.dtype == np.float32
    # Image 0 already has the model's size: no resampling, just the normalisation.
    expected = (pixels[0].astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(first[0], expected.transpose(2, 0, 1), atol=1e-5)
    assert reader.get_next()["x"].shape == (1, 3, 10, 12)
    assert reader.get_next() is None


def test_images_nhwc_grayscale_and_size_option(image_dir):
    folder, _ = image_dir
    feed = open_source(f"images:{folder}?size=4,5", _model(["N", "H", "W", 1]), batch_size=8).get_next()
    assert feed["x"].shape == (3, 4, 5, 1)
    assert 0.0 <= feed["x"].min() and feed["x"].max() <= 1.0


def test_images_errors(tmp_path, image_dir):
    folder, _ = image_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataSourceError, match="no image files"):
        open_source(f"images:{empty}", _model(["N", 3, 4, 4]))
    with pytest.raises(DataSourceError, match="static height"):
        open_source(f"images:{folder}", _model(["N", 3, "H", "W"]))
    with pytest.raises(DataSourceError, match="bad option"):
        ImageOptions.parse("layout=chwn")


def test_heldout_pngs_match_the_arrays(cnn_dir):
    reader = open_source(f"images:{cnn_dir / 'heldout_png'}", ir.load(cnn_dir / "model.onnx"), batch_size=50)
    ref = np.load(cnn_dir / "heldout" / "0000.npz")["input"]
    np.testing.assert_allclose(reader.get_next()["input"], ref, atol=1 / 255)


class _Reader:  # an onnxruntime-style CalibrationDataReader defined by a user
    def __init__(self):
        self.feeds = iter([{"x": np.zeros((4, 2), np.float32)} for _ in range(3)])

    def get_next(self):
        return next(self.feeds, None)


def test_limited_reader_cuts_the_last_batch():
    limited = LimitedReader(_Reader(), 6)
    sizes = []
    while (feed := limited.get_next()) is not None:
        sizes.append(feed["x"].shape[0])
    assert sizes == [4, 2]
