"""The seeds' thesis on the real MiniLM: int4 RTN accuracy by granularity, in both formats.

    python tools/granularity_table.py --model build/minilm/model.onnx --out docs/granularity.md

Prints a markdown table of mean sentence-embedding cosine vs FP32 on the model's eval sentences
(``eval.txt`` beside the model) and the output size, for per-tensor, per-channel, g128 and g32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from onnxfgq import Granularity, OutputFormat, QuantizeConfig, WeightConfig
from onnxfgq.api import quantize_file
from onnxfgq.calibration import open_source
from onnxfgq.evaluate import compare
from onnxfgq.graph import io

COLUMNS = {
    "per-tensor": dict(granularity=Granularity.TENSOR),
    "per-channel": dict(granularity=Granularity.CHANNEL),
    "group 128": dict(granularity=Granularity.GROUP, block_size=128),
    "group 32": dict(granularity=Granularity.GROUP, block_size=32),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("build/minilm/model.onnx"))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    text = args.model.parent / "eval.txt"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in (OutputFormat.MATMULNBITS, OutputFormat.QDQ):
            cells, sizes = [], []
            for label, kw in COLUMNS.items():
                out = Path(tmp) / f"{fmt.value}-{label.replace(' ', '')}.onnx"
                config = QuantizeConfig(weights=WeightConfig(bits=args.bits, format=fmt, **kw))
                report = quantize_file(args.model, out, config)
                reader = open_source(f"text:{text}", io.load(args.model), num_samples=args.samples, batch_size=64)
                metrics, _ = compare(args.model, out, reader)
                cells.append(f"{metrics['cosine_mean']:.3f}")
                sizes.append(f"{report.size_after / 1e6:.1f}")
                print(f"{fmt.value} {label}: cosine {cells[-1]}, {sizes[-1]} MB", file=sys.stderr)
            rows.append((fmt.value, cells, sizes))
    lines = [
        f"| int{args.bits} RTN, cosine vs FP32 ({args.samples} sentences) | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for fmt, cells, sizes in rows:
        lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
        lines.append(f"| {fmt} size, MB | " + " | ".join(sizes) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
