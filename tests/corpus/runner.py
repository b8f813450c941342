"""Run one third-party model through every quantization mode and measure its outputs against FP32.

The modes are the issue's list: weight-only int4 as MatMulNBits and as QDQ, int8 per-channel, static
int8 (activations too) and GPTQ. Each output is written by ``quantize_file`` (atomic, validated:
onnx.checker where the input passes it, and an onnxruntime load), then run in onnxruntime on inputs
that are not constant, and compared with the float model on the same inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxfgq import QuantizeConfig, WeightConfig, api
from onnxfgq.config import ActivationConfig, Algorithm, FeedConfig, Granularity, OutputFormat, Selection

CNN_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class Mode:
    name: str
    config: QuantizeConfig


def modes(op_types: tuple[str, ...] = ("MatMul", "Gemm"), *, block: int = 32, conv_int4: bool = True) -> dict[str, Mode]:
    """The five modes; ``op_types`` for the QDQ ones (Conv too for CNNs), MatMul/Gemm for the rest.
    ``conv_int4=False`` keeps int4 off convolutions (trained CNNs such as PP-OCR lose too much there)."""
    sel = Selection(op_types=op_types, min_elements=0)
    mm_sel = Selection(op_types=tuple(o for o in op_types if o != "Conv") or ("MatMul", "Gemm"), min_elements=0)
    int4_sel = sel if conv_int4 else mm_sel
    return {m.name: m for m in (
        Mode("int4-matmulnbits", QuantizeConfig(weights=WeightConfig(block_size=block,
                                                                     format=OutputFormat.MATMULNBITS),
                                                selection=mm_sel)),
        Mode("int4-qdq", QuantizeConfig(weights=WeightConfig(block_size=block, format=OutputFormat.QDQ),
                                        selection=int4_sel)),
        Mode("int8-channel", QuantizeConfig(weights=WeightConfig(bits=8, granularity=Granularity.CHANNEL,
                                                                 format=OutputFormat.QDQ), selection=sel)),
        Mode("static-int8", QuantizeConfig(activations=ActivationConfig(num_samples=16, batch_size=8,
                                                                        guard_samples=8))),
        Mode("gptq", QuantizeConfig(weights=WeightConfig(block_size=block, algorithm=Algorithm.GPTQ,
                                                         calibration="random", calibration_samples=16,
                                                         format=OutputFormat.MATMULNBITS), selection=mm_sel)),
    )}


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float activations
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def random_feed(path: Path, dims: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Normal floats and small non-negative integers (token ids) for every input; symbolic dims from
    ``dims`` (by name), else 2."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in session(path).get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else dims.get(str(d), 2) for d in i.shape]
        if "int" in i.type:
            feed[i.name] = rng.integers(0, dims.get("vocab", 50), shape).astype(np.int64)
        else:
            dt = np.float16 if "float16" in i.type else np.float32
            feed[i.name] = rng.standard_normal(shape).astype(dt)
    return feed


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_mode(src: Path, out: Path, mode: Mode, feed: dict[str, np.ndarray], dims: dict | None = None) -> float:
    """Quantize ``src`` into ``out`` with ``mode``; cosine of its first output against FP32 on ``feed``."""
    config = dataclasses.replace(mode.config, feeds=FeedConfig(dims=dims or {}))  # random calibration shapes
    if config.activations is not None:
        from onnxfgq.static import quantize_static_file

        report = quantize_static_file(src, out, config, dims=dims)
    else:
        report = api.quantize_file(src, out, config)
    assert report.quantized, f"{mode.name}: nothing quantized"
    ref = session(src).run(None, feed)[0]
    got = session(out).run(None, feed)[0]
    assert got.shape == ref.shape and np.all(np.isfinite(got))
    assert float(np.std(ref)) > 0, "the reference output is constant: the comparison would mean nothing"
    return cosine(ref, got)
