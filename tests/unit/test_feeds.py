"""Calibration and evaluation feeds: consistent decoder inputs, honest counts, every dim explained.

Each test here failed on the code before feeds.py (see the issue items in the docstrings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.calibration.feeds import DEFAULT_SPATIAL, FeedOptions, FeedPlan, InputSpec, Role, input_specs
from onnxfgq.calibration.sources import DataSourceError, iterate, open_source
from onnxfgq.cli import main
from tests.helpers import cli
from tests.unit import feeds_models

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def llama_hf(tmp_path_factory) -> Path:
    return feeds_models.llama_hf(tmp_path_factory.mktemp("llama-hf"))


@pytest.fixture(scope="session")
def builder_model(llama_hf, tmp_path_factory) -> Path:
    return feeds_models.builder_export(llama_hf, tmp_path_factory.mktemp("genai") / "model")


@pytest.fixture(scope="session")
def optimum_like(llama_hf, tmp_path_factory) -> Path:
    return feeds_models.optimum_like_export(llama_hf, tmp_path_factory.mktemp("optimum-like"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory) -> Path:
    return feeds_models.gpt2_export(tmp_path_factory.mktemp("gpt2"))


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def lines(tmp_path: Path) -> Path:
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(feeds_models.CORPUS[:5] + ["short", "a somewhat longer line of text than that"]))
    return text


# ------------------------------------------------------------------------------------- KV-cache decoders
def test_random_feeds_run_the_builder_export(builder_model):
    """GroupQueryAttention accepts the random feeds: past length 0, mask over the full length, the
    head size (symbolic 'kv_cache_dim' in the graph) read from genai_config.json (was: 1, rejected)."""
    model = ir.load(builder_model)
    reader = open_source("random", model, num_samples=3, batch_size=2,
                         options=FeedOptions(model_dir=builder_model.parent))
    assert "kv_cache_dim=16 (genai_config.json)" in reader.description
    assert "past_sequence_length=0" in reader.description
    sess = session(builder_model)
    feeds = list(iterate(reader))
    assert [f["input_ids"].shape[0] for f in feeds] == [2, 1]
    for feed in feeds:
        b, t = feed["input_ids"].shape
        assert feed["attention_mask"].shape == (b, t) and feed["attention_mask"].all()
        assert feed["past_key_values.0.key"].shape == (b, 2, 0, 16)
        logits = sess.run(["logits"], feed)[0]
        assert logits.shape == (b, t, feeds_models.VOCAB) and np.isfinite(logits).all()


def test_random_feeds_are_consistent_on_a_torch_kv_export(optimum_like):
    """optimum's dims: 'past_sequence_length' is the (empty) past, the mask's
    'past_sequence_length + sequence_length' is the full length, position ids count 0..T-1."""
    reader = open_source("random", ir.load(optimum_like), num_samples=2, batch_size=2, dims={"sequence_length": 12})
    feed = reader.get_next()
    assert feed["input_ids"].shape == (2, 12) and feed["attention_mask"].shape == (2, 12)
    assert feed["past_key_values.1.value"].shape == (2, 2, 0, 16)
    np.testing.assert_array_equal(feed["position_ids"], np.tile(np.arange(12), (2, 1)))
    assert "sequence_length=12 (--dim)" in reader.description
    logits, present = session(optimum_like).run(["logits", "present.0.key"], feed)
    assert logits.shape == (2, 12, feeds_models.VOCAB) and present.shape == (2, 2, 12, 16)


def test_text_feeds_build_every_decoder_input(optimum_like, tmp_path):
    """text: on a decoder gives position ids and an empty past, right padding with mask 0 there;
    the tokenizer is found in the model's folder (was: no position_ids, no past_key_values)."""
    text = lines(tmp_path)
    reader = open_source(f"text:{text}", ir.load(optimum_like), batch_size=4,
                         options=FeedOptions(model_dir=optimum_like.parent))
    feed = reader.get_next()
    assert set(feed) == {s.name for s in input_specs(ir.load(optimum_like))}
    mask = feed["attention_mask"]
    assert mask.shape == feed["input_ids"].shape and mask.min() == 0  # padded batch
    lengths = mask.sum(1)
    for row, n in zip(feed["position_ids"], lengths):
        np.testing.assert_array_equal(row[:n], np.arange(n))
    assert feed["past_key_values.0.key"].shape == (4, 2, 0, 16)
    logits = session(optimum_like).run(["logits"], feed)[0]
    assert np.isfinite(logits).all()
    # the real tokens' logits do not depend on the padding (causal model, padding on the right)
    alone = reader.plan.fill({"input_ids": feed["input_ids"][:1, :lengths[0]],
                              "attention_mask": mask[:1, :lengths[0]]}, 1, int(lengths[0]))
    np.testing.assert_allclose(session(optimum_like).run(["logits"], alone)[0][0], logits[0, :lengths[0]],
                               rtol=1e-4, atol=1e-4)


def test_padding_never_enters_the_statistics(optimum_like, tmp_path):
    """Rows collected per MatMul input = real tokens of the text, not the padded width."""
    from onnxfgq.calibrated import collect_stats
    from onnxfgq.config import WeightConfig

    text = lines(tmp_path)
    model = ir.load(optimum_like)
    wc = WeightConfig(calibration=f"text:{text}", calibration_samples=7, calibration_batch_size=4)
    name = next(n.inputs[0].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer())
    stats, used = collect_stats(model, [name], wc, lambda it, total, label: it,
                                FeedOptions(model_dir=optimum_like.parent))
    feeds = list(iterate(open_source(f"text:{text}", model, num_samples=7, batch_size=4,
                                     options=FeedOptions(model_dir=optimum_like.parent))))
    real = sum(int(f["attention_mask"].sum()) for f in feeds)
    padded = sum(f["attention_mask"].size for f in feeds)
    assert real < padded
    assert round(stats[name].rows) == real
    assert used.samples == 7 and used.batches == 2


def test_gptq_text_calibration_honours_tokenizer_from_another_cwd(optimum_like, llama_hf, tmp_path):
    """--tokenizer reaches weight-only calibration (was: ignored, then the error asked for it)."""
    model_dir = tmp_path / "bare"
    model_dir.mkdir()
    src = onnx.load(optimum_like)
    onnx.save(src, model_dir / "model.onnx")  # no tokenizer beside the model
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    text = lines(text_dir)  # nor beside the text
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    out = tmp_path / "q.onnx"
    proc = cli("quantize", str(model_dir / "model.onnx"), "-o", str(out), "--algo", "gptq", "--calibration",
               f"text:{text}", "--calib-samples", "7", "--tokenizer", str(llama_hf), "--no-eval",
               "--report", str(tmp_path / "r.json"), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("7 samples" in n and f"tokenizer {llama_hf}" in n for n in notes), notes
    assert out.is_file()


def test_builder_export_gptq_on_text_with_the_folder_tokenizer(builder_model, tmp_path):
    """The builder's folder: GPTQ on text: finds tokenizer.json beside the model (no --tokenizer),
    from another cwd; the default evaluation (random, consistent KV feeds) runs in GroupQueryAttention."""
    text = lines(tmp_path)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    report = tmp_path / "r.json"
    proc = cli("quantize", str(builder_model), "-o", str(out), "--algo", "gptq", "--calibration", f"text:{text}",
               "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert any(f"tokenizer {builder_model.parent}" in n and "7 samples" in n for n in data["notes"]), data["notes"]
    assert data["accuracy"]["samples"] == 8 and data["accuracy"]["metrics"]["cosine_mean"] > 0.9
    assert "kv_cache_dim=16 (genai_config.json)" in data["accuracy"]["data"]


def test_missing_tokenizer_is_one_clear_line(optimum_like, tmp_path):
    out = tmp_path / "q.onnx"
    text = lines(tmp_path)
    proc = cli("quantize", str(optimum_like), "-o", str(out), "--algo", "gptq", "--calibration", f"text:{text}",
               "--tokenizer", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "no tokenizer found in" in proc.stderr and "--calibration" in proc.stderr
    assert "Repo id" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_default_report_on_an_optimum_like_export(optimum_like, tmp_path):
    """The default run (random evaluation feeds) no longer crashes after the output is written."""
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(optimum_like), "-o", str(out), "--report", str(tmp_path / "r.json")]) == 0
    acc = json.loads((tmp_path / "r.json").read_text())["accuracy"]
    assert acc["samples"] == 8 and acc["metrics"]["cosine_mean"] > 0.9


# ------------------------------------------------------------------------------------- integer inputs
def test_token_ids_cover_the_vocab_through_a_reshape(gpt2):
    """GPT-2's input_ids reach the embedding Gather through a Reshape: ids uniform over the vocab
    (was: all zeros, GPTQ calibrated on token 0 only)."""
    model = ir.load(gpt2)
    (spec,) = input_specs(model)
    assert spec.index_bound == 300 and spec.role is Role.TOKENS
    ids = np.concatenate([f["input_ids"].ravel() for f in iterate(open_source("random", model, num_samples=64))])
    assert ids.min() >= 0 and ids.max() < 300
    assert len(np.unique(ids)) > 250  # 1024 draws from 300 ids
    assert "input_ids uniform in [0, 300)" in open_source("random", model).description


def test_index_bound_follows_cast_unsqueeze_flatten():
    nodes = [helper.make_node("Cast", ["ids"], ["c"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["c", "ax"], ["u"]),
             helper.make_node("Flatten", ["u"], ["f"], axis=0),
             helper.make_node("Gather", ["table", "f"], ["y"])]
    table = numpy_helper.from_array(np.zeros((37, 4), np.float32), "table")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [table, numpy_helper.from_array(np.array([0], np.int64), "ax")])
    m = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert input_specs(m)[0].index_bound == 37


# ------------------------------------------------------------------------------------- dims and counts
def _image_model(shape, *, name="x") -> onnx.ModelProto:
    """x [shape] -> ReduceMean over the spatial axes -> MatMul(w [C, 8]) -> y."""
    c = 3
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((c, 64)).astype(np.float32), "w")
    nodes = [helper.make_node("ReduceMean", [name, "axes"], ["p"], keepdims=0),
             helper.make_node("MatMul", ["p", "w"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "img", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w, numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_symbolic_image_size_gets_the_documented_default():
    """PP-OCR det's [?, 3, ?, ?]: 224 x 224 images, and the description says so (was: 1 x 1)."""
    m = ir.from_proto(_image_model(["n", 3, "h", "w"]))
    reader = open_source("random", m, num_samples=2, batch_size=2)
    assert reader.get_next()["x"].shape == (2, 3, DEFAULT_SPATIAL, DEFAULT_SPATIAL)
    assert f"h={DEFAULT_SPATIAL} (image size, default)" in reader.description
    reader = open_source("random", m, num_samples=1, dims={"h": 64, "w": 32})
    assert reader.get_next()["x"].shape == (1, 3, 64, 32)


def test_unknown_symbolic_dim_is_refused_before_the_work(tmp_path):
    """A dim that is neither batch, sequence, past nor image size: one line asking for --dim."""
    w = numpy_helper.from_array(np.ones((8, 4), np.float32) / 8, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "groups"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(DataSourceError, match=r"'groups' \(axis 1\); pass --dim groups=INT"):
        open_source("random", ir.load(path))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-o", str(out), "--min-elements", "1"]) == 2
    assert not out.exists()
    assert main(["quantize", str(path), "-o", str(out), "--min-elements", "1", "--dim", "groups=8"]) == 0


@pytest.fixture(scope="session")
def fixed_batch_cnn(cnn_dir, tmp_path_factory) -> Path:
    """The digits CNN with its batch dim fixed to 1 (as many exported CNNs are)."""
    m = onnx.load(cnn_dir / "model.onnx")
    dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    path = tmp_path_factory.mktemp("cnn-b1") / "model.onnx"
    onnx.save(m, path)
    return path


def test_fixed_batch_gives_the_samples_asked_for(fixed_batch_cnn, tmp_path):
    """128 samples of a [1, 1, 16, 16] model = 128 feeds of one (was: 8 feeds); the static report
    and its accuracy guard state the counts used (was: 8 calibrated, '64' claimed for the guard)."""
    reader = open_source("random", ir.load(fixed_batch_cnn), num_samples=128, batch_size=16)
    feeds = list(iterate(reader))
    assert len(feeds) == 128 and all(f["input"].shape[0] == 1 for f in feeds)
    report = tmp_path / "r.json"
    assert main(["quantize", str(fixed_batch_cnn), "-o", str(tmp_path / "s.onnx"), "--activations", "uint8",
                 "--calibration", "random", "--calib-samples", "40", "--no-eval", "--report", str(report)]) == 0
    notes = json.loads(report.read_text())["notes"]
    assert any("on 40 samples" in n for n in notes), notes
    assert any("accuracy guard" in n and "on 40 calibration samples" in n for n in notes), notes


def test_weight_only_calibration_counts_samples(fixed_batch_cnn, tmp_path):
    report = tmp_path / "r.json"
    assert main(["quantize", str(fixed_batch_cnn), "-o", str(tmp_path / "g.onnx"), "--algo", "gptq",
                 "--calibration", "random", "--calib-samples", "24", "--min-elements", "1", "--block-size", "16",
                 "--no-eval", "--report", str(report)]) == 0
    notes = json.loads(report.read_text())["notes"]
    assert any("calibrated on random: 24 samples in 24 batches" in n for n in notes), notes


def test_kv_heads_and_head_size_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "num_key_value_heads": 2,
                                                      "hidden_size": 256, "vocab_size": 1000}))
    specs = [InputSpec("input_ids", np.dtype(np.int64), ("b", "s"), None, Role.TOKENS),
             InputSpec("attention_mask", np.dtype(np.int64), ("b", "total"), None, Role.MASK),
             InputSpec("past.0.key", np.dtype(np.float16), ("b", "heads", "p", "d"), None, Role.PAST)]
    plan = FeedPlan(specs, FeedOptions(model_dir=tmp_path))
    feed = plan.fill({"input_ids": np.zeros((3, 16), np.int64)}, 3)
    assert feed["past.0.key"].shape == (3, 2, 0, 32) and feed["past.0.key"].dtype == np.float16
    assert feed["attention_mask"].shape == (3, 16)
    with pytest.raises(DataSourceError, match="pass --dim heads=INT"):
        FeedPlan(specs)  # no config beside the model


# ------------------------------------------------------------------------------------- flags
def test_eval_samples_zero_is_refused(tmp_path):
    from tests.helpers import mlp

    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-o", str(out), "--eval-samples", "0"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--calibration", "--eval-data"])
def test_bad_source_names_its_option(tmp_path, capsys, flag):
    from tests.helpers import mlp

    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    out = tmp_path / "q.onnx"
    extra = ["--algo", "gptq"] if flag == "--calibration" else []
    assert main(["quantize", str(path), "-o", str(out), flag, "nonsense", *extra]) == 2
    err = capsys.readouterr().err
    assert f"{flag} 'nonsense'" in err and "--data" not in err
    assert not out.exists()


@pytest.mark.slow
def test_random_feeds_on_a_dynamo_kv_export(llama_hf, tmp_path):
    """torch.onnx.export(dynamo=True) names its dims itself: the roles still give a consistent feed."""
    from models.llm_exports import export_torch

    path = export_torch(llama_hf, tmp_path / "model.onnx", dynamo=True)
    reader = open_source("random", ir.load(path), num_samples=3, batch_size=2)
    sess = session(path)
    for feed in iterate(reader):
        b, t = feed["input_ids"].shape
        assert feed["past_key_values.0.key"].shape == (b, 2, 0, 16)
        assert sess.run(["logits"], feed)[0].shape == (b, t, feeds_models.VOCAB)
