"""--rotate: the rotations (quant/rotation.py) and the graph pass (graph/rotate/) on hand-built decoders
whose norms take every form the exporters emit; the reference is the unrotated model in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfgq import QuantizeConfig, WeightConfig, quantize
from onnxfgq.cli.args import build_parser, config_from_args
from onnxfgq.config import Algorithm, ConfigError, Granularity
from onnxfgq.graph import rotate
from onnxfgq.quant import rotation as rot
from tests.helpers import cli, run

D, H, KV, HD, FFN, VOCAB, T = 32, 4, 2, 8, 64, 50, 7


# ------------------------------------------------------------------------------------------ matrices
@pytest.mark.parametrize("n", [1, 2, 8, 12, 20, 24, 64, 128, 384, 768])
def test_hadamard_orders_are_hadamard(n):
    h = rot.hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", [64, 384, 100, 36])  # 100 and 36: no construction here, QR fallback
def test_rotation_is_orthogonal_and_seeded(n):
    r = rot.make_rotation(n, seed=3)
    assert r.kind == ("randomized Hadamard" if rot.hadamard(n) is not None else "random orthogonal")
    np.testing.assert_allclose(r.matrix @ r.matrix.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(r.matrix, rot.make_rotation(n, seed=3).matrix)
    assert not np.array_equal(r.matrix, rot.make_rotation(n, seed=4).matrix)
    assert not np.array_equal(r.matrix, rot.make_rotation(n, seed=3, stream=1).matrix)


def test_folding_keeps_the_product():
    rng = np.random.default_rng(0)
    x, w, g = rng.standard_normal((5, 24)), rng.standard_normal((24, 9)), rng.uniform(0.5, 2, 24)
    r = rot.make_rotation(24, 0).matrix
    np.testing.assert_allclose((x @ r) @ rot.rotate_input(w, r, g), (x * g) @ w, atol=1e-12)
    np.testing.assert_allclose(rot.rotate_output(w.T, r) @ r.T, w.T, atol=1e-12)
    # per head: V's columns (three heads of 8) and O's rows; a packed QKV rotates only its V columns
    r2 = rot.make_rotation(8, 0).matrix
    v = rot.rotate_head_output(w.T, r2, 0, 24)  # [9, 24]: heads along the last axis
    o = rng.standard_normal((24, 4))
    np.testing.assert_allclose(v @ rot.rotate_head_input(o, r2), w.T @ o, atol=1e-12)
    packed = rot.rotate_head_output(w.T, r2, 8, 24)
    np.testing.assert_array_equal(packed[:, :8], w.T[:, :8])
    np.testing.assert_allclose(packed[:, 8:], v[:, 8:], atol=1e-12)


# ------------------------------------------------------------------------------ hand-built decoders
def _decoder(norm: str, *, seed: int = 0, outlier: float = 1.0, positions: bool = False,
             hidden_out: bool = False, tied: bool = False) -> onnx.ModelProto:
    """A 2-layer GQA decoder (embedding, norms, attention with Softmax @ V, SwiGLU, lm_head) with biases on
    V and O. ``norm``: decomposed | simplified | skip | rms23 | layernorm. ``outlier`` scales one channel
    of every norm's gamma (an outlier feature, the case rotations are for). ``positions``: a constant
    [T, D] added to the embedding (position embeddings an exporter folded); ``hidden_out``: the final
    normalized hidden state is a second graph output; ``tied``: the lm_head reads the embedding table
    through a Transpose."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def w(name, *shape, scale=0.2):
        return const(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def node(op, ins, n_out=1, domain="", **attrs):
        name = f"n{len(nodes)}"
        outs = [f"{name}_out{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def gamma(i):
        g = rng.uniform(0.5, 1.5, D).astype(np.float32)
        g[3] *= outlier
        return const(f"gamma{i}", g)

    count = iter(range(100))

    def normalize(x, skip=None):
        """(normalized, new stream): a Skip norm also returns input + skip."""
        i = next(count)
        if skip is not None and norm == "skip":
            outs = node("SkipSimplifiedLayerNormalization", [x, skip, gamma(i)], 4, domain="com.microsoft",
                        epsilon=1e-5)
            return outs[0], outs[3]
        if skip is not None:
            x = node("Add", [x, skip])
        if norm in ("simplified", "skip"):
            return node("SimplifiedLayerNormalization", [x, gamma(i)], axis=-1, epsilon=1e-5), x
        if norm == "rms23":
            return node("RMSNormalization", [x, gamma(i)], axis=-1, epsilon=1e-5), x
        if norm == "layernorm":
            beta = const(f"beta{i}", rng.standard_normal(D).astype(np.float32) * 0.1)
            return node("LayerNormalization", [x, gamma(i), beta], axis=-1, epsilon=1e-5), x
        sq = node("Pow", [x, const(f"two{i}", np.float32(2))])
        mean = node("ReduceMean", [sq, const(f"axes{i}", np.array([-1], np.int64))])
        inv = node("Reciprocal", [node("Sqrt", [node("Add", [mean, const(f"eps{i}", np.float32(1e-5))])])])
        return node("Mul", [gamma(i), node("Mul", [x, inv])]), x

    def heads(x, n, perm):  # [1, T, n*HD] -> [1, n, T, HD] -> GQA repeat to H heads (perm applied last)
        y = node("Transpose", [node("Reshape", [x, const(f"s{len(nodes)}", np.array([1, -1, n, HD]))])],
                 perm=[0, 2, 1, 3])
        if n != H:
            y = node("Unsqueeze", [y, const(f"u{len(nodes)}", np.array([2]))])
            y = node("Expand", [y, const(f"e{len(nodes)}", np.array([1, n, H // n, 1, 1]))])
            y = node("Reshape", [y, const(f"r{len(nodes)}", np.array([1, H, -1, HD]))])
        return node("Transpose", [y], perm=perm) if perm else y

    stream = node("Gather", [w("embed", VOCAB, D, scale=1.0), "input_ids"], axis=0)
    if positions:
        stream = node("Add", [stream, w("positions", T, D, scale=0.5)])
    pending = None
    for layer in range(2):
        h, stream = normalize(stream, pending)
        q = heads(node("MatMul", [h, w(f"wq{layer}", D, H * HD)]), H, None)
        k = heads(node("MatMul", [h, w(f"wk{layer}", D, KV * HD)]), KV, [0, 1, 3, 2])
        v_lin = node("Add", [node("MatMul", [h, w(f"wv{layer}", D, KV * HD)]), w(f"bv{layer}", KV * HD)])
        v = heads(v_lin, KV, None)
        scores = node("Mul", [node("MatMul", [q, k]), const(f"scale{layer}", np.float32(HD ** -0.5))])
        att = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        att = node("Reshape", [node("Transpose", [att], perm=[0, 2, 1, 3]), const(f"m{layer}", np.array([1, -1, D]))])
        o = node("Add", [w(f"bo{layer}", D), node("MatMul", [att, w(f"wo{layer}", H * HD, D)])])
        h, stream = normalize(stream, o)
        gate = node("MatMul", [h, w(f"wg{layer}", D, FFN)])
        act = node("Mul", [gate, node("Sigmoid", [gate])])
        pending = node("MatMul", [node("Mul", [act, node("MatMul", [h, w(f"wu{layer}", D, FFN)])]),
                                  w(f"wd{layer}", FFN, D)])
    h, _ = normalize(stream, pending)
    head = node("Transpose", ["embed"], perm=[1, 0]) if tied else w("head", D, VOCAB)
    nodes.append(helper.make_node("MatMul", [h, head], ["logits"], name="lm_head"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, T, VOCAB])]
    if hidden_out:
        outputs.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, T, D]))
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, T])],
                              outputs, inits)
    opsets = [helper.make_opsetid("", 23 if norm == "rms23" else 18)]
    if norm == "skip":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


IDS = {"input_ids": np.random.default_rng(1).integers(0, VOCAB, (1, T)).astype(np.int64)}


def _rotated(proto: onnx.ModelProto, seed: int = 0) -> tuple[onnx.ModelProto, rotate.Applied]:
    model = ir.from_proto(proto)
    applied = rotate.apply(model, seed)
    return ir.to_proto(model), applied


def _scales(proto: onnx.ModelProto) -> list[np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    out = []
    for n in proto.graph.node:
        if n.op_type in ("SimplifiedLayerNormalization", "RMSNormalization", "SkipSimplifiedLayerNormalization"):
            out.append(inits[n.input[2 if n.op_type.startswith("Skip") else 1]])
        if n.op_type == "Mul" and any(inits.get(i) is not None and inits[i].shape == (D,) for i in n.input):
            out += [inits[i] for i in n.input if i in inits]
    return out


@pytest.mark.parametrize("norm", ["decomposed", "simplified", "skip", "rms23"])
def test_rotated_decoder_computes_the_same_logits(norm):
    proto = _decoder(norm)
    rotated, applied = _rotated(proto)
    assert applied.r1 and applied.r2_layers == 2, applied.notes
    assert "R1 randomized Hadamard of size 32" in applied.notes[0] and "5 norms" in applied.notes[0]
    assert "4 writers" in applied.notes[0] and "11 readers" in applied.notes[0]
    assert "head size 8 on 2 attention" in applied.notes[1]
    ref, = run(proto, IDS)
    got, = run(rotated, IDS)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    scales = _scales(rotated)
    assert len(scales) == 5 and all(np.array_equal(s, np.ones(D, np.float32)) for s in scales)  # folded out
    # the weights did change: the embedding table is E R, not E
    inits = {i.name: numpy_helper.to_array(i) for i in rotated.graph.initializer}
    table = inits[next(n.input[0] for n in rotated.graph.node if n.op_type == "Gather")]
    assert not np.allclose(table, numpy_helper.to_array(proto.graph.initializer[0]))


def test_pre_ln_layernorm_decoder_is_rotated_exactly():
    """Pre-LN LayerNorms (with beta, V/O biases, an lm_head without one): the stream is made mean-free
    (writers centred), each LayerNorm becomes an RMS norm, beta goes into the readers' biases (one inserted
    after the lm_head), then R1 and R2 as for RMSNorm."""
    proto = _decoder("layernorm")
    rotated, applied = _rotated(proto)
    assert applied.r1 and applied.r2_layers == 2, applied.notes
    assert "5 pre-LN LayerNormalizations made RMS norms" in applied.notes[0] and "11 reader biases" in applied.notes[0]
    assert not any(n.op_type == "LayerNormalization" for n in rotated.graph.node)
    assert [o.name for o in rotated.graph.output] == ["logits"]
    ref, = run(proto, IDS)
    got, = run(rotated, IDS)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_unsupported_stream_reader_leaves_r1_off_and_names_it():
    proto = _decoder("decomposed")
    # a per-channel Mul on the stream (not a norm, not a residual Add): the rotation cannot pass it
    gather = next(n for n in proto.graph.node if n.op_type == "Gather")
    proto.graph.initializer.append(numpy_helper.from_array(np.linspace(0.5, 1.5, D).astype(np.float32), "chan"))
    mul = helper.make_node("Mul", [gather.output[0], "chan"], ["scaled"], name="odd_scale")
    for n in proto.graph.node:
        for i, x in enumerate(n.input):
            if x == gather.output[0]:
                n.input[i] = "scaled"
    proto.graph.node.insert(list(proto.graph.node).index(gather) + 1, mul)
    rotated, applied = _rotated(proto)
    assert not applied.r1
    assert any("R1 not applied" in n and "odd_scale" in n for n in applied.notes)
    ref, = run(proto, IDS)
    got, = run(rotated, IDS)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_folded_position_constant_is_rotated_and_a_hidden_output_stops_r1():
    proto = _decoder("decomposed", positions=True)
    rotated, applied = _rotated(proto)
    assert applied.r1, applied.notes
    np.testing.assert_allclose(run(rotated, IDS)[0], run(proto, IDS)[0], atol=1e-5)
    proto = _decoder("decomposed", hidden_out=True)
    rotated, applied = _rotated(proto)
    assert not applied.r1 and applied.r2_layers == 2
    assert "is a graph output" in applied.notes[0], applied.notes
    for ref, got in zip(run(proto, IDS), run(rotated, IDS)):
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_tied_table_is_untied_only_when_the_final_scale_requires_it_and_says_so():
    proto = _decoder("decomposed", tied=True)  # final gamma != 1: E R and R^T diag(g) E^T differ
    rotated, applied = _rotated(proto)
    assert applied.r1 and "'embed', shared by differently rotated nodes, was copied (untied)" in applied.notes[0]
    ref, = run(proto, IDS)
    got, = run(rotated, IDS)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_seed_changes_weights_not_function():
    proto = _decoder("decomposed")
    a, _ = _rotated(proto, 0)
    b, _ = _rotated(proto, 0)
    c, _ = _rotated(proto, 7)
    assert a.SerializeToString() == b.SerializeToString()
    wa = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    wc = {i.name: numpy_helper.to_array(i) for i in c.graph.initializer}
    assert not np.array_equal(wa["head_rot"], wc["head_rot"])
    np.testing.assert_allclose(run(a, IDS)[0], run(c, IDS)[0], atol=1e-4)


def _logit_sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2)))


def test_rotation_helps_int4_per_channel_with_an_outlier_channel():
    """One stream channel 20x larger (gamma): per-channel int4 of the readers loses it; rotated, it is
    spread over all 32 rows. Every rotation seed gains (measured 1.3-7.9 dB), the median by 3 dB."""
    proto = _decoder("decomposed", outlier=20.0, seed=2)
    wc = WeightConfig(bits=4, granularity=Granularity.CHANNEL, symmetric=False)
    ref, = run(proto, IDS)
    plain = quantize(proto, QuantizeConfig(weights=wc)).model
    rotated = quantize(proto, QuantizeConfig(weights=wc, rotate=True, rotate_seed=0))
    assert any(n.startswith("rotate (seed 0): R1") for n in rotated.report.notes)
    gain = [_logit_sqnr(ref, run(ir.to_proto(rotated.model), IDS)[0]) - _logit_sqnr(ref, run(ir.to_proto(plain), IDS)[0])]
    for seed in (1, 2, 3, 4):
        r = quantize(proto, QuantizeConfig(weights=wc, rotate=True, rotate_seed=seed)).model
        gain.append(_logit_sqnr(ref, run(ir.to_proto(r), IDS)[0]) - _logit_sqnr(ref, run(ir.to_proto(plain), IDS)[0]))
    assert min(gain) > 0.5 and float(np.median(gain)) > 3.0, gain


def test_config_round_trip_and_refusals():
    cfg = QuantizeConfig(rotate=True, rotate_seed=5)
    back = QuantizeConfig.from_json(cfg.to_json())
    assert back == cfg and json.loads(cfg.to_json())["rotate_seed"] == 5
    with pytest.raises(ConfigError, match="--rotate-seed"):
        QuantizeConfig(rotate=True, rotate_seed=-1).validate()


def test_cli_rotate_with_static_is_one_error_line(tmp_path):
    path = tmp_path / "d.onnx"
    onnx.save(_decoder("decomposed"), path)
    proc = cli("quantize", path, "-o", tmp_path / "out.onnx", "--rotate", "--activations", "uint8",
               "--calibration", "random")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "--rotate" in proc.stderr
    assert not (tmp_path / "out.onnx").exists()
    args = build_parser().parse_args(["quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--rotate",
                                      "--rotate-seed", "3"])
    cfg = config_from_args(args)
    assert cfg.rotate and cfg.rotate_seed == 3
    assert not config_from_args(build_parser().parse_args(["quantize", str(path), "-o", "x.onnx"])).rotate


@pytest.mark.parametrize("algo", ["rtn", "gptq", "awq", "clip", "awq+gptq+clip"])
def test_every_algorithm_runs_on_the_rotated_weights(algo):
    """Calibrated algorithms observe the rotated float model (the pass runs before calibration): each one,
    per-channel int4 on the outlier decoder, ends at least as close to FP32 with --rotate as without."""
    proto = _decoder("decomposed", outlier=20.0, seed=2)
    ref, = run(proto, IDS)
    calib = {} if algo == "rtn" else {"calibration": "random", "calibration_samples": 8}
    wc = WeightConfig(bits=4, granularity=Granularity.CHANNEL, algorithm=Algorithm(algo), **calib)
    sqnr = {}
    for rotate_ in (False, True):
        result = quantize(proto, QuantizeConfig(weights=wc, rotate=rotate_, rotate_seed=2))
        assert any(n.startswith("rotate (seed 2): R1") for n in result.report.notes) == rotate_
        sqnr[rotate_] = _logit_sqnr(ref, run(ir.to_proto(result.model), IDS)[0])
    print(f"\n{algo}: logits SQNR without / with --rotate {sqnr[False]:.1f} / {sqnr[True]:.1f} dB")
    assert sqnr[True] > sqnr[False], sqnr


@pytest.mark.parametrize("which", ["minilm", "opt"])
def test_layernorm_models(which, minilm_dir, opt_tiny_dir):
    """MiniLM is post-LN (the residual stream is each LayerNorm's output, gamma and beta included): R1 stays
    off with that reason, R2 on every layer's V/O. OPT is pre-LN: R1 too, made exact, its tied embedding and
    lm_head still tied (stored once)."""
    from onnxfgq.graph.roles import find_roles

    path = (minilm_dir if which == "minilm" else opt_tiny_dir) / "model.onnx"
    proto = onnx.load(str(path))
    rotated, applied = _rotated(proto)
    layers = {"minilm": 6, "opt": 2}[which]
    assert applied.r2_layers == layers, applied.notes
    if which == "minilm":
        assert not applied.r1
        assert "R1 not applied" in applied.notes[0] and "(post-LN)" in applied.notes[0], applied.notes
    else:
        assert applied.r1 and "pre-LN LayerNormalizations made RMS norms" in applied.notes[0], applied.notes
        assert find_roles(ir.from_proto(rotated).graph).tied
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 250, (2, 12)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if which == "minilm":
        feed["token_type_ids"] = np.zeros_like(ids)
    ref, = run(proto, feed)
    got, = run(rotated, feed)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()
