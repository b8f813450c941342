"""engine/executors.py: a block's solves give the same codes on any executor, worker count and order."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.api import quantize_file
from onnxfgq.config import Algorithm, ConfigError, QuantizeConfig, WeightConfig
from onnxfgq.engine.executors import ThreadExecutor, make_executor
from tests.helpers import ROOT

WC = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration="random")


def _groups(seed: int = 0) -> list[tuple[ActivationStats, list]]:
    """Three inputs (one read by two weights), correlated activations, GPTQ-sized problems."""
    rng = np.random.default_rng(seed)
    groups = []
    for k, ns in ((256, (192, 64)), (192, (128,)), (320, (96,))):
        st = ActivationStats()
        mix = rng.standard_normal((k, k)) / np.sqrt(k)
        st.update((rng.standard_normal((512, k)) @ mix).astype(np.float32))
        items = [((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), QuantSpec(4, (32, 1), False))
                 for n in ns]
        groups.append((st, items))
    return groups


def test_threads_give_the_codes_of_one_thread_in_any_order():
    one = list(ThreadExecutor(workers=1).map(WC, _groups()))
    many = list(ThreadExecutor(workers=3).map(WC, _groups()[::-1]))[::-1]  # submitted in reverse
    tight = list(ThreadExecutor(workers=3, budget=0).map(WC, _groups()))  # memory budget: one at a time
    assert len(one) == len(many) == len(tight) == 3
    for a, b in [*zip(one, many), *zip(one, tight)]:
        for qa, qb in zip(a, b):
            assert np.array_equal(qa.codes, qb.codes)
            assert np.array_equal(qa.qparams.scale, qb.qparams.scale)
            assert np.array_equal(qa.qparams.zero_point, qb.qparams.zero_point)
    # and the solves are GPTQ, not RTN: better output error than rounding on the same statistics
    from onnxfgq.algorithms.rtn import RTN
    from onnxfgq.algorithms.stats import output_error

    st, items = _groups()[0]
    w, spec = items[0]
    h = st.hessian()
    assert output_error(w, one[0][0].dequantize(), h) < 0.9 * output_error(w, RTN().solve(w, spec).dequantize(), h)


def test_unknown_executor_is_refused():
    with pytest.raises(ConfigError, match="--executor: choose one of threads, ray"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="--executor"):
        QuantizeConfig(weights=WeightConfig(executor="dask")).validate()


@pytest.mark.slow
def test_ray_executor_writes_the_bytes_of_the_thread_executor(tmp_path):
    """A local Ray cluster (2 CPUs): the tiny generated Llama, GPTQ block by block, byte for byte."""
    ray = pytest.importorskip("ray")
    sys.path.insert(0, str(ROOT / "tools"))
    from make_large_llama import build

    model = build(tmp_path / "llama", layers=2, hidden=64, ffn=160, vocab=300, heads=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        outs = {}
        for executor in ("threads", "ray"):
            (tmp_path / executor).mkdir()
            out = tmp_path / executor / "q.onnx"
            wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration="random", calibration_samples=8,
                              calibration_batch_size=4, engine="blocks", executor=executor)
            report = quantize_file(model, out, QuantizeConfig(weights=wc))
            outs[executor] = [out.read_bytes(), out.with_name("q.onnx.data").read_bytes()]
            if executor == "ray":
                assert any("solves on ray" in n for n in report.notes), report.notes
        assert outs["ray"] == outs["threads"]
        assert ray.is_initialized()  # a cluster the caller started is left running
    finally:
        ray.shutdown()
