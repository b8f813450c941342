"""``onnxfgq inspect`` and ``onnxfgq calibrate``."""

from __future__ import annotations

from onnxfgq.cli.args import activation_config_from_args, parse_dims
from onnxfgq.cli.console import make_console, rich_progress
from onnxfgq.config import Selection, Simplify


def cmd_inspect(args) -> int:
    from rich.table import Table

    from onnxfgq.graph import io, sanity
    from onnxfgq.graph.targets import find_targets, has_foldable_weights

    model = io.load(args.model)
    sel = Selection(op_types=tuple(args.op_types.split(",")), quantize_embeddings=args.quantize_embeddings)
    # The graph quantize sees: same checks, same normalisation, same simplification rule.
    sanity.check(model)
    notes = sanity.normalize(model)
    simplify = Simplify(args.simplify)
    if simplify is Simplify.ALWAYS or (simplify is Simplify.AUTO and has_foldable_weights(model.graph, sel.op_types)):
        result = io.simplify(model)
        model = result.model
        notes.append(result.note)
    table = Table(title=str(args.model))
    for col in ("node", "op", "weight shape", "dtype", "quantizable"):
        table.add_column(col)
    n = 0
    for t in find_targets(model, sel):
        n += t.skip_reason is None
        table.add_row(t.name, t.node.op_type, "x".join(map(str, t.weight_shape)), t.chain.tensor.dtype.name,
                      "yes" if t.skip_reason is None else t.skip_reason)
    console = make_console()
    console.print(table)
    for note in notes:
        console.print(f"note: {note}")
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in model.opset_imports.items())
    console.print(f"{n} quantizable weights; {len(model.graph)} nodes; opsets {opsets}")
    return 0


def cmd_calibrate(args) -> int:
    from onnxfgq.config import Simplify
    from onnxfgq.graph import io
    from onnxfgq.static import calibrate_file

    act = activation_config_from_args(args)
    io.check_writable(args.output, "-o")
    ranges = calibrate_file(args.model, args.output, act, progress=rich_progress, tokenizer=args.tokenizer,
                            dims=parse_dims(args.dim), simplify=Simplify.NEVER if args.no_simplify else Simplify.AUTO)
    make_console().print(f"wrote {args.output}: ranges of {len(ranges.ranges)} tensors from {ranges.samples} samples "
                     f"of {args.data} ({ranges.observer} observer)")
    return 0
