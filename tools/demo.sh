#!/usr/bin/env bash
# The main job on the embedded default: export the real all-MiniLM-L6-v2, quantize it to int4 g128
# (MatMulNBits), and print the report with accuracy against FP32 on 512 real sentences.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[models]"
python -m models.minilm --out build/minilm
exec onnxfgq quantize build/minilm/model.onnx --block-size 128 -o build/minilm/model.int4.onnx \
  --eval-data text:build/minilm/eval.txt --eval-samples 512 --batch-size 64 "$@"
