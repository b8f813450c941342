"""Emitter for our own op, ``com.onnxfgq::MatMulBlockQuant`` (custom_ops/): what the standard ops
cannot express, such as 3, 5, 6 or 7 bits and block sizes that are not powers of two.

Layout (custom_ops/README.md): B is uint8 ``[N, ceil(K*bits/8)]``, each row a little-endian bit
stream of that output column's K codes; scales ``[N, ceil(K/block_size)]`` in A's type; optional
unpacked uint8 zero points of the same shape (default ``2**(bits-1)``); optional bias ``[N]``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxfgq import ops
from onnxfgq.algorithms import QuantizedWeight
from onnxfgq.config import Granularity, OutputFormat
from onnxfgq.graph.emit import MatMulNBitsEmitter, _replace_node, column_qparams
from onnxfgq.graph.targets import Target
from onnxfgq.quant.bitstream import pack_bitstream


class CustomOpEmitter(MatMulNBitsEmitter):
    """MatMul/Gemm -> MatMulBlockQuant; embedding tables still go to GatherBlockQuantized (4/8 bits)."""

    format = OutputFormat.CUSTOM

    def block_k(self, k: int) -> int:
        if self.config.granularity is Granularity.GROUP:
            return min(self.config.block_size, k)
        return k  # one group spans K: per-channel needs no power of two here

    def weight_block_k(self, k: int, qw: QuantizedWeight) -> int:
        bk, bn = qw.qparams.block_shape
        return bk if bn == 1 and bk < k else self.block_k(k)

    def emit(self, target: Target, qw: QuantizedWeight) -> int:
        if target.kind == "gather":
            return self._emit_gather(target, qw)
        k, n = target.shape_kn
        bits, bk = qw.bits, self.weight_block_k(k, qw)
        scales, zp_nb = column_qparams(target, qw, bk)
        zp = None if zp_nb is None else ir.tensor(zp_nb.astype(np.uint8))
        packed = pack_bitstream(np.ascontiguousarray(qw.codes.T), bits)
        key = target.chain.key + (target.transposed,)
        (b, s, z), nbytes = self._register(target, key, target.chain.root.name or target.name,
                                           [ir.tensor(packed), ir.tensor(scales), zp])
        bias = self._folded_bias(target)
        inputs = [target.node.inputs[0], b, s, z]
        if bias is not None:
            nbytes += bias.const_value.nbytes
            inputs.append(bias)
        while inputs and inputs[-1] is None:
            inputs.pop()
        node = ir.node(ops.OP_TYPE, inputs, {"K": k, "N": n, "bits": bits, "block_size": bk},
                       domain=ops.DOMAIN, name=target.name + "_" + ops.OP_TYPE)
        self._use_domain(target, ops.DOMAIN, ops.OPSET_VERSION)
        _replace_node(target.node.graph, target.node, [node], node.outputs[0])
        return nbytes
