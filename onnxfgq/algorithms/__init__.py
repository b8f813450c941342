"""Weight quantization algorithms behind one contract: ``observe(x)`` then ``solve(w, spec)``."""

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec, WeightQuantizer, make_quantizer
from onnxfgq.algorithms.rtn import RTN

__all__ = ["RTN", "QuantSpec", "QuantizedWeight", "WeightQuantizer", "make_quantizer"]
