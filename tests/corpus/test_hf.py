"""Transformer exports made here (tests/corpus/hf_exports.py: BERT, GPT-2, T5 encoder, ViT, Whisper
encoder; tiny random configs with unit-gain weights) from both torch exporters, through every mode.
Floors: cosine of the hidden states against FP32 on random inputs (padded mask included), a margin
under what was measured (tests/corpus/README.md)."""

from __future__ import annotations

import pytest

from tests.corpus.hf_exports import ARCHS, EXPORTERS, export, feed
from tests.corpus.runner import modes, run_mode

pytest.importorskip("transformers")

FLOOR = {"int4-matmulnbits": 0.93, "int4-qdq": 0.93, "int8-channel": 0.998, "static-int8": 0.99, "gptq": 0.95}
MODES = modes()
FAST = (("bert", "legacy"), ("gpt2", "dynamo"))


def _check(tmp_path, arch, exporter, mode_name):
    src = export(arch, exporter)
    cos = run_mode(src, tmp_path / f"{arch}-{exporter}.{mode_name}.onnx", MODES[mode_name], feed(src))
    assert cos >= FLOOR[mode_name], f"{arch} ({exporter}) {mode_name}: cosine {cos:.4f} < {FLOOR[mode_name]}"


@pytest.mark.parametrize("mode_name", sorted(MODES))
@pytest.mark.parametrize("arch, exporter", FAST)
def test_exports_fast(tmp_path, arch, exporter, mode_name):
    _check(tmp_path, arch, exporter, mode_name)


@pytest.mark.slow
@pytest.mark.parametrize("mode_name", sorted(MODES))
@pytest.mark.parametrize("arch, exporter", [(a, e) for a in ARCHS for e in EXPORTERS if (a, e) not in FAST])
def test_exports_all(tmp_path, arch, exporter, mode_name):
    _check(tmp_path, arch, exporter, mode_name)
