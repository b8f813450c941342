"""Calibration and evaluation data: readers that yield input feeds for onnxruntime."""

from onnxfgq.calibration.sources import (
    CalibrationDataReader,
    InputSpec,
    NpyFolderReader,
    RandomReader,
    TextReader,
    input_specs,
    open_source,
)

__all__ = [
    "CalibrationDataReader",
    "InputSpec",
    "NpyFolderReader",
    "RandomReader",
    "TextReader",
    "input_specs",
    "open_source",
]
