#!/usr/bin/env python3
"""Build libonnxfgq_ops.so: fetch the ONNX Runtime headers (cached in build/ort-headers/) and run cmake.

    python tools/build_custom_ops.py            # CPU kernels always, CUDA kernels when nvcc is found
    python tools/build_custom_ops.py --cuda OFF # CPU only (faster)
    python tools/build_custom_ops.py --headers-only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _load_build_module():
    """onnxfgq/_build_ops.py by path: stdlib only, so the build runs before the package (and its
    dependencies) are installed, without importing onnxfgq/__init__.py."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "onnxfgq" / "_build_ops.py"
    spec = importlib.util.spec_from_file_location("onnxfgq_build_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build_ops = _load_build_module()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", choices=["AUTO", "ON", "OFF"], default="AUTO", type=str.upper)
    parser.add_argument("--force", action="store_true", help="delete the cmake build folder first")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--headers-only", action="store_true", help="only fetch the ONNX Runtime headers")
    parser.add_argument("--verbose", action="store_true", help="show cmake's output")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.headers_only:
            print(_build_ops.fetch_ort_headers())
            return 0
        library = _build_ops.build(force=args.force, cuda=args.cuda, jobs=args.jobs, verbose=args.verbose)
    except _build_ops.BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {library} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
