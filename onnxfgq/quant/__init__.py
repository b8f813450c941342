"""Pure numpy quantization math: ranges, qparams, quantize/dequantize, packing.

Nothing in this package imports onnx; graph code calls into it, never the reverse.
"""

from onnxfgq.quant.blocks import block_reduce, expand_blocks, num_blocks
from onnxfgq.quant.core import (
    QParams,
    QRange,
    compute_qparams,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    sqnr_db,
)
from onnxfgq.quant.packing import (
    pack_int4,
    pack_matmulnbits,
    pack_matmulnbits_kn,
    pack_matmulnbits_zero_points,
    unpack_int4,
    unpack_matmulnbits,
    unpack_matmulnbits_zero_points,
)

__all__ = [
    "QParams",
    "QRange",
    "block_reduce",
    "compute_qparams",
    "dequantize",
    "expand_blocks",
    "fake_quantize",
    "num_blocks",
    "pack_int4",
    "pack_matmulnbits",
    "pack_matmulnbits_kn",
    "pack_matmulnbits_zero_points",
    "qrange",
    "quantize",
    "sqnr_db",
    "unpack_int4",
    "unpack_matmulnbits",
    "unpack_matmulnbits_zero_points",
]
