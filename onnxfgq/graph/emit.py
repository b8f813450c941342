"""Emitters: turn a quantized weight into nodes and initializers of one output format.

Emitters only lay out bytes (through ``onnxfgq.quant``) and edit the graph; every number was
decided by an algorithm before they run. One emitter instance serves one model and caches what it
emitted per weight, so a weight shared by several nodes is stored once.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import onnx_ir as ir

from onnxfgq.algorithms import QuantizedWeight
from onnxfgq.config import Granularity, OutputFormat, WeightConfig
from onnxfgq.graph.spool import Spool
from onnxfgq.graph.targets import Target, constant_chain
from onnxfgq.quant import pack_int4, pack_matmulnbits_kn, pack_matmulnbits_zero_points
from onnxfgq.quant.layouts import resample_blocks, signed_codes

MS_DOMAIN = "com.microsoft"


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _float_dtype(target: Target) -> np.dtype:
    dt = target.chain.tensor.dtype
    return np.dtype(np.float16) if dt == ir.DataType.FLOAT16 else np.dtype(np.float32)


def column_qparams(target: Target, qw: QuantizedWeight, block_k: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales ``[N, ceil(K/block_k)]`` in the activations' float type, and the integer zero points of
    the same shape (None when symmetric): the per-column layout MatMulNBits and our op share."""
    k, n = target.shape_kn
    scales = resample_blocks(qw.qparams.scale, qw.qparams, (k, n), 0, block_k).astype(_float_dtype(target))
    if qw.symmetric:
        return scales, None
    return scales, resample_blocks(qw.qparams.zero_point, qw.qparams, (k, n), 0, block_k)


def _digest(*arrays: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def _replace_node(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], new_output: ir.Value) -> None:
    ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, [old.outputs[0]], [new_output])


def _gemm_bias(target: Target) -> tuple[ir.Value | None, bool]:
    """(bias value to fold, ok). ``ok`` is False when C exists but cannot be folded into a [N] bias."""
    node = target.node
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None, True
    chain = constant_chain(node.inputs[2])
    n = target.shape_kn[1]
    if chain is None:
        return None, False
    c = chain.array()
    if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1):
        return None, False
    beta = node.attributes.get_float("beta", 1.0)
    bias = np.broadcast_to(c.reshape(-1), (n,)) * beta
    return ir.Value(name="", const_value=ir.tensor(bias.astype(_float_dtype(target)))), True


class Emitter:
    """Base: caching of shared weights and the opset bookkeeping."""

    format: OutputFormat

    def __init__(self, model: ir.Model, config: WeightConfig, spool: Spool | None = None):
        self.model = model
        self.spool = spool  # where new initializers' bytes go (None: they stay in memory)
        self.graph = model.graph
        self.config = config
        self._cache: dict[tuple, tuple[ir.Value | None, ...]] = {}
        self._tables: dict[tuple, tuple[bytes, object]] = {}
        self._functions = {id(f.graph): f for f in model.functions.values()}

    # Where new tensors go: initializers of the graph holding the node (a control-flow body may read
    # outer-scope initializers, but onnxruntime's DQ -> MatMulNBits fusion inside a body only finds
    # the body's own); a model-local function has no initializers, so there they become Constant
    # nodes placed before the node that reads them.
    def _constant(self, target: Target, base: str, tensor: ir.TensorProtocol) -> ir.Value:
        graph = target.node.graph
        if id(graph) not in self._functions:
            name, i = base, 0
            while name in graph.initializers or name in self.graph.initializers:  # no shadowing either
                i += 1
                name = f"{base}_{i}"
            return _initializer(graph, name, self.spool.put(tensor) if self.spool is not None else tensor)
        taken = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        node = ir.node("Constant", [], {"value": tensor}, name=f"{name}_Constant")
        out = node.outputs[0]
        out.name, out.shape, out.type = name, tensor.shape, ir.TensorType(tensor.dtype)
        out.const_value = tensor  # a value known at build time (not an initializer: not serialised as one)
        graph.insert_before(target.node, node)
        return out

    def _use_domain(self, target: Target, domain: str, version: int = 1) -> None:
        """Import ``domain`` in the model and, for a node inside a function, in that function too."""
        self.model.opset_imports.setdefault(domain, version)
        function = self._functions.get(id(target.node.graph))
        if function is not None:
            function.opset_imports.setdefault(domain, version)

    def _scope_key(self, target: Target) -> tuple:
        """Shared weights share storage within the graph that holds them."""
        graph = target.node.graph
        return () if graph is self.graph else (id(graph),)

    def can_emit(self, target: Target) -> str | None:
        """Why this emitter cannot handle ``target`` (None if it can)."""
        if target.kind != "matmul":
            return f"{target.node.op_type} weights need --format qdq"
        if target.node.op_type == "Gemm" and not _gemm_bias(target)[1]:
            return "Gemm bias is not a constant [N] vector"
        return None

    def emit(self, target: Target, qw: QuantizedWeight) -> int:
        """Rewrite ``target``'s node; returns the bytes of new initializers (0 for a shared weight)."""
        raise NotImplementedError

    # Tied weights: an embedding table and an output projection holding the same matrix (the
    # exporter often stores lm_head as a transposed copy). Tables are emitted first and remembered
    # by content; a MatMul whose quantized weight is identical reuses the table's storage.
    def _remember_table(self, target: Target, qw: QuantizedWeight, payload) -> None:
        shape_key = (qw.codes.shape, qw.bits, tuple(qw.qparams.block_shape))
        self._tables[shape_key] = (_digest(qw.codes, qw.qparams.scale, qw.qparams.zero_point), payload)

    def _tied_table(self, target: Target, qw: QuantizedWeight):
        """The payload remembered for a table identical to this MatMul weight (seen as [N, K]), or None."""
        if target.kind != "matmul" or not self._tables:
            return None
        shape_key = (qw.codes.shape[::-1], qw.bits, tuple(qw.qparams.block_shape[::-1]))
        entry = self._tables.get(shape_key)
        if entry is None:
            return None
        digest = _digest(qw.codes.T, qw.qparams.scale.T, qw.qparams.zero_point.T)
        return entry[1] if digest == entry[0] else None

    def _folded_bias(self, target: Target) -> ir.Value | None:
        """Gemm's ``beta * C`` as a registered ``[N]`` initializer (None for MatMul or no C)."""
        bias, _ = _gemm_bias(target)
        if bias is not None:
            bias = self._constant(target, target.name + "_bias", bias.const_value)
        return bias

    def _register(self, target: Target, key: tuple, base: str,
                  tensors: list[ir.TensorProtocol | None]) -> tuple[tuple, int]:
        key = key + self._scope_key(target)
        if key in self._cache:
            return self._cache[key], 0
        values, nbytes = [], 0
        for suffix, t in zip(("_q", "_scales", "_zp"), tensors):
            if t is None:
                values.append(None)
                continue
            values.append(self._constant(target, base + suffix, t))
            nbytes += t.nbytes
        self._cache[key] = tuple(values)
        return self._cache[key], nbytes


class MatMulNBitsEmitter(Emitter):
    """``com.microsoft::MatMulNBits``: group-wise with a power-of-two block; channel and tensor
    granularity use one block spanning K (rounded up to a power of two, padded with zero codes)."""

    format = OutputFormat.MATMULNBITS

    def block_k(self, k: int) -> int:
        """The MatMulNBits block for a reduced axis of ``k``: the configured group, or for channel and
        tensor granularity the power of two >= 16 that stores codes + repeated scales in the fewest
        bytes (a block spanning K pads the codes up to a power of two; a divisor of K does not)."""
        if self.config.granularity is Granularity.GROUP:
            return self.config.block_size
        top = max(16, 1 << math.ceil(math.log2(k)))
        candidates = [1 << i for i in range(4, top.bit_length())]

        def nbytes(b: int) -> float:
            blocks = math.ceil(k / b)
            return blocks * b * self.config.bits / 8 + blocks * 4
        return min(candidates, key=lambda b: (nbytes(b), -b))

    def weight_block_k(self, k: int, qw: QuantizedWeight) -> int:
        """The weight's own group size when it is group-wise along K (adaptive granularity and mixed
        precision choose one per weight), else the configured layout."""
        bk, bn = qw.qparams.block_shape
        if bn == 1 and bk < k:
            if bk < 16 or bk & (bk - 1):
                raise ValueError(f"MatMulNBits needs a power-of-two block >= 16, not {bk}")
            return bk
        return self.block_k(k)

    def can_emit(self, target: Target) -> str | None:
        if target.kind == "gather":
            if self.config.bits not in (4, 8):
                return f"GatherBlockQuantized has 4 and 8 bits, not {self.config.bits}"
            return None
        return super().can_emit(target)

    def emit(self, target: Target, qw: QuantizedWeight) -> int:
        if target.kind == "gather":
            return self._emit_gather(target, qw)
        k, n = target.shape_kn
        bits, bk = qw.bits, self.weight_block_k(k, qw)
        key = target.chain.key + (target.transposed,)
        scales, zp_nb = column_qparams(target, qw, bk)
        zp = None if zp_nb is None else ir.tensor(pack_matmulnbits_zero_points(zp_nb, bits))
        tied = self._tied_table(target, qw)
        if tied is not None and tied[3] == bk and k % bk == 0:  # same bytes: view the table as B
            data, s, z, _ = tied
            shape = self._constant(target, target.name + "_tied_shape",
                                   ir.tensor(np.array([n, k // bk, bk * bits // 8], np.int64)))
            reshape = ir.node("Reshape", [data, shape], name=target.name + "_tied_B")
            target.node.graph.insert_before(target.node, reshape)
            b, nbytes = reshape.outputs[0], 0
        else:
            blob = pack_matmulnbits_kn(qw.codes, bits, bk)
            (b, s, z), nbytes = self._register(target, key, target.chain.root.name or target.name,
                                               [ir.tensor(blob), ir.tensor(scales), zp])
        bias = self._folded_bias(target)
        inputs = [target.node.inputs[0], b, s, z]
        if bias is not None:
            nbytes += bias.const_value.nbytes
            inputs += [None, bias]  # input 4 (g_idx) stays empty
        node = ir.node(
            "MatMulNBits", inputs, {"K": k, "N": n, "bits": bits, "block_size": bk,
                                    "accuracy_level": self.config.accuracy_level},
            domain=MS_DOMAIN, name=target.name + "_MatMulNBits",
        )
        self._use_domain(target, MS_DOMAIN)
        _replace_node(target.node.graph, target.node, [node], node.outputs[0])
        return nbytes

    def _emit_gather(self, target: Target, qw: QuantizedWeight) -> int:
        """Gather on a ``[rows, hidden]`` table -> GatherBlockQuantized (uint8 data, blocks along hidden)."""
        rows, hidden = qw.codes.shape
        bits, bk = qw.bits, self.block_k(hidden)
        zp = None
        if not qw.symmetric:
            zp_nb = resample_blocks(qw.qparams.zero_point, qw.qparams, (rows, hidden), 1, bk)
            zp = ir.tensor(pack_matmulnbits_zero_points(zp_nb, bits))
        scales = resample_blocks(qw.qparams.scale, qw.qparams, (rows, hidden), 1, bk)
        data = pack_matmulnbits_zero_points(qw.codes, bits)  # same row packing: low bits first
        (d, s, z), nbytes = self._register(
            target, target.chain.key + ("gather",), target.chain.root.name or target.name,
            [ir.tensor(data), ir.tensor(scales.astype(_float_dtype(target))), zp],
        )
        self._remember_table(target, qw, (d, s, z, bk))
        inputs = [d, target.node.inputs[1], s] + ([z] if z is not None else [])
        node = ir.node("GatherBlockQuantized", inputs,
                       {"bits": bits, "block_size": bk, "gather_axis": 0, "quantize_axis": 1},
                       domain=MS_DOMAIN, name=target.name + "_GatherBlockQuantized")
        self._use_domain(target, MS_DOMAIN)
        _replace_node(target.node.graph, target.node, [node], node.outputs[0])
        return nbytes


class QDQEmitter(Emitter):
    """Standard ``DequantizeLinear`` feeding the original node (blocked needs opset 21)."""

    format = OutputFormat.QDQ

    def can_emit(self, target: Target) -> str | None:
        return None

    def emit(self, target: Target, qw: QuantizedWeight) -> int:
        tied = self._tied_table(target, qw)
        if tied is not None:  # read the embedding table's dequantized copy (transposed unless transB)
            weight = tied
            if not target.transposed:
                tr = ir.node("Transpose", [tied], {"perm": [1, 0]}, name=target.name + "_tied_T")
                target.node.graph.insert_before(target.node, tr)
                weight = tr.outputs[0]
            target.node.replace_input_with(target.input_index, weight)
            return 0
        bits = qw.bits
        sym = qw.symmetric
        codes = signed_codes(qw.codes, bits) if sym else qw.codes
        scale, zero = qw.qparams.scale, qw.qparams.zero_point
        block_shape = qw.qparams.block_shape
        if target.kind == "matmul" and target.transposed:  # qw is [K, N]; the node sees [N, K]
            codes, scale, zero, block_shape = codes.T, scale.T, zero.T, block_shape[::-1]
        attrs, scale, zero = self._axis_attrs(target, block_shape, scale, zero)
        dtype = _float_dtype(target)
        if bits == 4:
            qtype = ir.DataType.INT4 if sym else ir.DataType.UINT4
            q = ir.PackedTensor(pack_int4(codes), qtype, shape=codes.shape)
            z = None if sym else ir.PackedTensor(pack_int4(zero), qtype, shape=zero.shape)
        else:
            np_t = np.int8 if sym else np.uint8
            q = ir.tensor(codes.astype(np_t))
            z = None if sym else ir.tensor(np.asarray(zero).astype(np_t))
        key = target.chain.key + (target.transposed,)
        (qv, sv, zv), nbytes = self._register(
            target, key, target.chain.root.name or target.name, [q, ir.tensor(np.asarray(scale, dtype=dtype)), z]
        )
        dq = ir.node("DequantizeLinear", [qv, sv, zv] if zv is not None else [qv, sv], attrs,
                     name=target.name + "_DequantizeLinear")
        target.node.graph.insert_before(target.node, dq)
        function = self._functions.get(id(target.node.graph))
        if function is not None:  # the function's ops follow the model's (upgraded) opset
            function.opset_imports[""] = max(function.opset_imports.get("", 1), self.model.opset_imports.get("", 1))
        target.node.replace_input_with(target.input_index, dq.outputs[0])
        if target.kind == "gather":
            self._remember_table(target, qw, dq.outputs[0])
        return nbytes

    @staticmethod
    def _axis_attrs(target: Target, block_shape: tuple[int, ...], scale: np.ndarray, zero: np.ndarray):
        """DequantizeLinear attributes and scale/zero-point arrays, in the layout the node sees."""
        nb = scale.shape
        if all(b == 1 for b in nb):  # per-tensor
            return {}, scale.reshape(()), zero.reshape(())
        red = target.reduced_axis
        chan = target.channel_axis
        if nb[red] == 1 and all(b == 1 for i, b in enumerate(nb) if i != chan):
            return {"axis": chan}, scale.reshape(-1), zero.reshape(-1)  # per-channel
        return {"axis": red, "block_size": int(block_shape[red])}, scale, zero


def make_emitter(model: ir.Model, config: WeightConfig, spool: Spool | None = None) -> Emitter:
    fmt = config.resolved_format()
    if fmt is OutputFormat.MATMULNBITS:
        return MatMulNBitsEmitter(model, config, spool)
    if fmt is OutputFormat.QDQ:
        return QDQEmitter(model, config, spool)
    if fmt is OutputFormat.CUSTOM:
        from onnxfgq.graph.emit_custom import CustomOpEmitter

        return CustomOpEmitter(model, config, spool)
    raise ValueError(f"no emitter for format {fmt}")
