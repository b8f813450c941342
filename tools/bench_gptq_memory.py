"""Peak memory and time of one GPTQ solve at a large layer shape (a 7B model's down projection by default).

Run it under ``/usr/bin/time -v`` so the peak RSS is measured from outside the process:

    /usr/bin/time -v python tools/bench_gptq_memory.py --k 11008 --n 4096

``--gptq-file`` loads GPTQ from another copy of ``onnxfgq/algorithms/gptq.py`` (for example an older
commit's, via ``git show REV:onnxfgq/algorithms/gptq.py > old.py``) to compare versions side by side.
The printed checksum of the codes shows whether two versions wrote the same codes.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxfgq.algorithms.base import QuantSpec  # noqa: E402
from onnxfgq.algorithms.stats import ActivationStats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=11008, help="input features (rows of W)")
    ap.add_argument("--n", type=int, default=4096, help="output features")
    ap.add_argument("--rows", type=int, default=2048, help="calibration rows")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--gptq-file", type=Path, help="another gptq.py to load GPTQ from")
    args = ap.parse_args()
    if args.gptq_file:
        spec = importlib.util.spec_from_file_location("gptq_other", args.gptq_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from onnxfgq.algorithms import gptq as module
    rng = np.random.default_rng(0)
    stats = ActivationStats()
    for start in range(0, args.rows, 1024):
        stats.update(rng.standard_normal((min(1024, args.rows - start), args.k), dtype=np.float32))
    w = rng.standard_normal((args.k, args.n), dtype=np.float32) * 0.02
    t0 = time.perf_counter()
    q = module.GPTQ(stats).solve(w, QuantSpec(4, (args.block_size, 1), False))
    print(f"K={args.k} N={args.n}: solve {time.perf_counter() - t0:.1f} s, "
          f"codes checksum {int(q.codes.astype(np.int64).sum())}")


if __name__ == "__main__":
    main()
