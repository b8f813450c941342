"""The argument parser and the translation of its flags into config objects.

Every default comes from the config dataclasses (the API's defaults)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from onnxfgq.config import (
    EXECUTORS,
    ActivationConfig,
    ActivationType,
    Algorithm,
    ConfigError,
    FeedConfig,
    Granularity,
    LMHead,
    ObserverKind,
    OutputFormat,
    QuantizeConfig,
    Selection,
    Simplify,
    WeightConfig,
)

_W = WeightConfig()


_S = Selection()


_A = ActivationConfig()


def parse_dims(values: list[str]) -> dict[str, int]:
    dims = {}
    for v in values:
        name, sep, num = v.partition("=")
        if not sep or not num.isdigit():
            raise ConfigError("--dim", f"expected NAME=INT, got {v!r}")
        dims[name] = int(num)
    return dims


def _add_data_args(p: argparse.ArgumentParser, default_samples: int) -> None:
    p.add_argument("--eval-data", default="random", metavar="SRC",
                   help="inputs for the accuracy report: 'random', 'text:FILE', or a folder of .npy/.npz "
                        "(default: random)")
    p.add_argument("--eval-samples", type=int, default=default_samples, help="samples to evaluate on")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of evaluation inputs")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder for text:FILE (default: FILE's folder)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                   help="value of a symbolic input dimension for random inputs (repeatable)")


def _add_lm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("causal language models")
    g.add_argument("--perplexity", metavar="text:FILE",
                   help="evaluate as a causal LM instead of comparing outputs: perplexity over windows of FILE "
                        "and next-token top-1 agreement with the float model")
    g.add_argument("--lm-window", type=int, default=128, metavar="TOKENS", help="tokens per window (128)")
    g.add_argument("--lm-max-windows", type=int, default=64, metavar="N", help="windows evaluated, 0 = all (64)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onnxfgq", description="Fine-grained post-training quantization of ONNX models.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize the weights of MatMul/Gemm (and more) nodes")
    q.add_argument("model", type=Path, help="an .onnx file, or an export folder (genai_config.json / config.json)")
    q.add_argument("-o", "--output", type=Path,
                   help="output path (default: MODEL.<bits>bit.onnx beside it; a folder in: FOLDER.<bits>bit)")
    q.add_argument("--bits", type=int, default=_W.bits)
    q.add_argument("--block-size", type=int, default=_W.block_size,
                   help=f"group size along the reduction axis (default {_W.block_size}); 0 means per-channel")
    q.add_argument("--granularity", choices=[g.value for g in Granularity], default=None,
                   help="tensor, channel or group (default: group, or channel with --block-size 0)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="zero point fixed at mid-range (default: asymmetric, fitted per block)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    q.add_argument("--format", choices=[f.value for f in OutputFormat], default=_W.format.value)
    q.add_argument("--algo", choices=[a.value for a in Algorithm], default=_W.algorithm.value)
    q.add_argument("--accuracy-level", type=int, default=None,
                   help=f"MatMulNBits accuracy_level (default {_W.accuracy_level}; 4 with --target cpu)")
    q.add_argument("--target", choices=sorted(TARGETS), default=None,
                   help="tune for a runtime: 'cpu' = MatMulNBits accuracy_level 4 (int8 activations: about 2x "
                        "the decode speed of level 0 in onnxruntime-genai on CPU, as fast as the builder's int4); "
                        "an explicit --accuracy-level still wins")
    q.add_argument("--op-types", default=",".join(_S.op_types), help="comma-separated op types to quantize")
    q.add_argument("--include", action="append", default=[], metavar="REGEX", help="only nodes whose name matches")
    q.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="skip nodes whose name matches")
    q.add_argument("--min-elements", type=int, default=_S.min_elements, help="weights smaller than this stay float")
    q.add_argument("--quantize-embeddings", action="store_true", default=_S.quantize_embeddings,
                   help="also quantize Gather tables (GatherBlockQuantized / DequantizeLinear)")
    q.add_argument("--lm-head", choices=[m.value for m in LMHead], default=_S.lm_head.value,
                   help="a language model's output projection (found by role, whatever its name): quantized "
                        "like the rest (same), at 8 bits (8: more accurate, about 10%% slower decoding), left "
                        f"in float (float), or auto (like the rest); default {_S.lm_head.value}")
    q.add_argument("--simplify", choices=[v.value for v in Simplify], default=QuantizeConfig().simplify.value,
                   help="onnxsim first: auto runs it only when a weight is computed from constants")
    q.add_argument("--rotate", action="store_true", default=QuantizeConfig().rotate,
                   help="fold randomized Hadamard rotations into the float weights before quantizing (QuaRot/"
                        "SpinQuant R1 on the residual stream through RMS norms, R2 per attention head on V/O; "
                        "same float function, no extra op); the report says what was rotated")
    q.add_argument("--rotate-seed", type=int, default=QuantizeConfig().rotate_seed, metavar="N",
                   help="seed of the --rotate rotations (random signs; recorded in the report)")
    q.add_argument("--external-data", choices=["auto", "always", "never"], default="auto")
    q.add_argument("--report", type=Path, metavar="OUT.json", help="write the report as JSON")
    q.add_argument("--no-eval", action="store_true", help="skip the accuracy comparison")
    c = q.add_argument_group("calibrated weight algorithms (GPTQ, AWQ, clipping, adaptive, mixed precision)")
    c.add_argument("--calibration", default=_W.calibration or None, metavar="SRC",
                   help="calibration data: 'text:FILE', a folder of .npy/.npz, or 'random' (needed by gptq/awq)")
    c.add_argument("--calib-samples", type=int, default=_W.calibration_samples, help="calibration samples")
    c.add_argument("--calib-batch-size", type=int, default=_W.calibration_batch_size,
                   help="batch size of calibration inputs")
    c.add_argument("--max-error", default=None, metavar="BUDGET",
                   help="--granularity adaptive: per-layer error budget, a relative error (e.g. 0.01) or "
                        f"sqnr:DB (default {_W.max_error}); output error with --calibration, else weight error")
    c.add_argument("--target-bits", type=float, default=_W.target_bits or None, metavar="BITS",
                   help="mixed precision: choose 4 or 8 bits per layer (and the block, if adaptive) for at "
                        "most this average of stored bits per weight, scales and zero points included")
    c.add_argument("--gptq-damp", type=float, default=_W.gptq_damp, help="GPTQ dampening (fraction of mean diag H)")
    c.add_argument("--no-act-order", dest="act_order", action="store_false", default=_W.gptq_act_order,
                   help="GPTQ: process rows in their order instead of by decreasing salience")
    c.add_argument("--sequential", dest="sequential", action="store_true", default=_W.gptq_sequential,
                   help="GPTQ: re-collect later layers' inputs from the partly quantized model (whole model: one "
                        "calibration pass per few layers; --engine blocks: each block calibrated on what the "
                        "quantized blocks before it produce) instead of taking every input from the float model")
    c.add_argument("--gptaq", action="store_true", default=_W.gptaq,
                   help="--engine blocks, GPTQ: asymmetric calibration (GPTAQ): fit each layer, on the inputs the "
                        "quantized blocks before it produce, to the float model's output")
    c.add_argument("--gptaq-alpha", type=float, default=_W.gptaq_alpha, metavar="ALPHA",
                   help="--gptaq: how far towards the float model's output, 0 (plain GPTQ) .. 1 (the full "
                        "least-squares target); default: chosen per layer on held-out calibration batches")
    c.add_argument("--engine", choices=["auto", "whole", "blocks"], default=_W.engine,
                   help="calibration: run the whole model at once, or block by block (the graph cut at its "
                        "residual stream, each block run alone over cached activations: memory bounded by one "
                        "block, same statistics); auto: blocks above 2 GiB of weights or with --gptaq")
    c.add_argument("--resume", action="store_true",
                   help="--engine blocks: continue an interrupted run from its work folder OUT.onnxfgq-work "
                        "(each finished block is checkpointed there; same output bytes as an uninterrupted run)")
    c.add_argument("--executor", choices=list(EXECUTORS), default=_W.executor,
                   help="--engine blocks: solve a block's weights on threads of this process, or as tasks on "
                        "a Ray cluster (RAY_ADDRESS, else a local one; pip install 'onnxfgq[ray]'); same output")
    _add_data_args(q, default_samples=8)
    _add_lm_args(q)
    _add_static_args(q)

    i = sub.add_parser("inspect", help="list the weights a quantize run would touch")
    i.add_argument("model", type=Path)
    i.add_argument("--op-types", default=",".join(_S.op_types))
    i.add_argument("--quantize-embeddings", action="store_true")
    i.add_argument("--simplify", choices=[v.value for v in Simplify], default=QuantizeConfig().simplify.value,
                   help="as quantize does: onnxsim first (auto: only when a weight is computed from constants)")

    e = sub.add_parser("eval", help="compare a quantized model's outputs with the float model's")
    e.add_argument("reference", type=Path)
    e.add_argument("candidate", type=Path)
    _add_data_args(e, default_samples=32)
    _add_lm_args(e)
    _add_calibrate_parser(sub)
    return ap


def config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    granularity = args.granularity
    if granularity is None:
        granularity = "channel" if args.block_size == 0 else "group"
    elif args.block_size == 0 and granularity == "group":
        raise ConfigError("--block-size", "0 means per-channel; it cannot go with --granularity group")
    weights = WeightConfig(
        bits=args.bits, granularity=Granularity(granularity), block_size=args.block_size or _W.block_size,
        symmetric=_target_value(args, "symmetric"), algorithm=Algorithm(args.algo), format=OutputFormat(args.format),
        accuracy_level=_target_value(args, "accuracy_level"), **_calibrated_args(args),
    )
    op_types = tuple(t.strip() for t in args.op_types.split(",") if t.strip())
    if not op_types:
        raise ConfigError("--op-types", "needs at least one op type")
    selection = Selection(op_types=op_types, include=tuple(args.include), exclude=tuple(args.exclude),
                          min_elements=args.min_elements, quantize_embeddings=args.quantize_embeddings,
                          lm_head=LMHead(args.lm_head))
    _check_regexes(selection)
    config = QuantizeConfig(weights=weights, selection=selection, simplify=Simplify(args.simplify),
                            feeds=FeedConfig(tokenizer=str(args.tokenizer or ""), dims=parse_dims(args.dim)),
                            rotate=bool(getattr(args, "rotate", False)), rotate_seed=getattr(args, "rotate_seed", 0))
    if getattr(args, "activations", None):
        config = dataclasses.replace(config, activations=activation_config_from_args(args))
    config.validate()
    return config


# --target presets: WeightConfig fields the named runtime is fastest with (measured in docs/BENCHMARKS.md,
# "Speed defaults"); an explicit flag overrides its field.
# Symmetric is not part of "cpu": it decoded no faster and lost accuracy (MiniLM cosine -0.013, test-LLM
# perplexity +0.4); accuracy_level 4 costs <= 0.0005 cosine.
TARGETS = {"cpu": {"accuracy_level": 4}}


def _target_value(args: argparse.Namespace, name: str):
    value = getattr(args, name, None)
    if value is not None:
        return value
    preset = TARGETS.get(getattr(args, "target", None) or "", {})
    return preset.get(name, getattr(_W, name))


def _weight_error_budget(text: str) -> float:
    """'0.01' (relative error) or 'sqnr:20' (dB; 20 dB is 0.01)."""
    metric, sep, value = text.strip().lower().rpartition(":")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number < 0 or (sep and metric != "sqnr"):
        raise ConfigError("--max-error", f"expected a relative error like 0.01 or sqnr:DB, got {text!r}")
    return 10 ** (-number / 10) if sep else number


def _calibrated_args(args: argparse.Namespace) -> dict:
    """WeightConfig fields of the calibrated algorithms (absent attributes keep the defaults)."""
    out: dict = {}
    if getattr(args, "calibration", None):
        out["calibration"] = args.calibration
    for name, field_ in (("calib_samples", "calibration_samples"), ("calib_batch_size", "calibration_batch_size"),
                         ("gptq_damp", "gptq_damp"), ("act_order", "gptq_act_order"), ("sequential", "gptq_sequential"),
                         ("gptaq", "gptaq"), ("gptaq_alpha", "gptaq_alpha"), ("target_bits", "target_bits"),
                         ("engine", "engine"), ("executor", "executor")):
        if getattr(args, name, None) is not None:
            out[field_] = getattr(args, name)
    if getattr(args, "max_error", None) is not None and args.granularity == Granularity.ADAPTIVE.value:
        out["max_error"] = _weight_error_budget(args.max_error)
    return out


def _check_regexes(selection: Selection) -> None:
    import re

    for opt, patterns in (("--include", selection.include), ("--exclude", selection.exclude)):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ConfigError(opt, f"bad regular expression {p!r}: {exc}") from None


def _add_static_args(q: argparse.ArgumentParser) -> None:
    """Static int8 (weights + activations) options of ``quantize``. The calibration options are shared
    with the calibrated weight-only algorithms: whichever adds them first defines them."""
    g = q.add_argument_group("static int8: weights and activations (QDQ)")
    g.add_argument("--activations", choices=[t.value for t in ActivationType], default=None,
                   help="quantize activations too (static QDQ with per-channel int8 weights)")
    _add_observer_args(g)
    g.add_argument("--activation-symmetric", action="store_true", default=_A.symmetric,
                   help="symmetric activation ranges (default: asymmetric)")
    g.add_argument("--no-cle", action="store_true",
                   help="static: no cross-layer equalisation of Conv -> [Relu] -> Conv pairs")
    g.add_argument("--no-bias-correction", action="store_true",
                   help="static: no correction of the bias for the expected shift of weight rounding")
    g.add_argument("--adaround", action=argparse.BooleanOptionalAction, default=_A.adaround,
                   help="static: choose each int8 weight's rounding (up or down) to minimise its layer's output "
                        f"error on the calibration data (AdaRound; default {'on' if _A.adaround else 'off'})")
    g.add_argument("--wide-activations", action=argparse.BooleanOptionalAction, default=_A.wide_activations,
                   help="static: nodes the accuracy guard keeps out of 8-bit activations get 16-bit ones "
                        "(int8 weights, opset 21) where the budget allows, instead of float "
                        f"(default {'on' if _A.wide_activations else 'off'})")
    for flags, kw in (
        (("--calibration",), dict(default=None, metavar="SRC|ranges.json",
                                  help="calibration data source, or a ranges.json from 'onnxfgq calibrate'")),
        (("--calib-samples",), dict(type=int, default=None, help="calibration samples")),
        (("--calib-batch-size",), dict(type=int, default=None, help="calibration batch size")),
        (("--max-error",), dict(default=None, metavar="BUDGET",
                                help=f"static: output budget vs FP32 on calibration data, cosine:X, sqnr:DB, "
                                     f"top1:X (argmax agreement of the output rows) or none "
                                     f"(default {_A.max_error})")),
    ):
        try:
            g.add_argument(*flags, **kw)
        except argparse.ArgumentError:
            pass  # already defined by the calibrated weight-only options; static mode reads the same value


def _add_observer_args(p) -> None:
    p.add_argument("--observer", choices=[o.value for o in ObserverKind], default=_A.observer.value,
                   help=f"activation range observer (default {_A.observer.value})")
    p.add_argument("--percentile", type=float, default=_A.percentile, help="percentile observer's percentile")


def activation_config_from_args(args: argparse.Namespace) -> ActivationConfig:
    """ActivationConfig from ``quantize --activations`` or ``calibrate`` flags (unset ones: defaults)."""
    def given(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    max_error = getattr(args, "max_error", None)
    act = ActivationConfig(
        dtype=ActivationType(given("activations", _A.dtype.value)),
        symmetric=given("activation_symmetric", _A.symmetric),
        observer=ObserverKind(given("observer", _A.observer.value)),
        percentile=given("percentile", _A.percentile),
        calibration=given("calibration", None) or given("data", None) or _A.calibration,
        num_samples=given("calib_samples", _A.num_samples),
        batch_size=given("calib_batch_size", _A.batch_size),
        max_error=str(max_error) if max_error is not None else _A.max_error,
        cle=not getattr(args, "no_cle", False),
        bias_correction=not getattr(args, "no_bias_correction", False),
        adaround=given("adaround", _A.adaround),
        wide_activations=given("wide_activations", _A.wide_activations),
    )
    act.validate()
    return act


def _add_calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="collect activation ranges for static quantization (ranges.json)")
    c.add_argument("model", type=Path)
    c.add_argument("--data", required=True, metavar="SRC",
                   help="'random', 'text:FILE', 'images:DIR' or a folder of .npy/.npz files")
    c.add_argument("-o", "--output", type=Path, default=Path("ranges.json"), help="ranges file to write")
    c.add_argument("--calib-samples", type=int, default=_A.num_samples, help="calibration samples")
    c.add_argument("--calib-batch-size", type=int, default=_A.batch_size, help="calibration batch size")
    _add_observer_args(c)
    c.add_argument("--tokenizer", type=Path, help="tokenizer folder for text:FILE (default: FILE's folder)")
    c.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                   help="value of a symbolic input dimension for random inputs (repeatable)")
    c.add_argument("--no-simplify", action="store_true", help="skip onnxsim (must match the quantize run)")
