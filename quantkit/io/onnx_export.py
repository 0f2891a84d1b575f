"""Export to ONNX for ONNX Runtime (``quantkit export OUT --to onnx``).

The causal LM is exported with ``torch.onnx.export(dynamo=True)``: one input
``input_ids`` int64 [batch, sequence] (both dynamic), one output ``logits`` fp32
[batch, sequence, vocab]; no attention mask input (every token attends causally to all
earlier ones, as ``model(input_ids)`` does), no past key/values (the graph recomputes the
whole sequence; see docs/export.md).

Packed layers are swapped, for the export only, for modules that call an export-only op
whose translation emits one ONNX Runtime contrib op per layer, so the weights stay packed
in the file:

    lut4 (nf4/fp4)  ->  com.microsoft::MatMulBnb4(A, B, absmax) [+ Add(bias)]
        B       uint8 [(N*K+1)//2]   quantkit's packed bytes, unchanged (bnb layout, high
                                     nibble = even element; blocks over the row-major
                                     flattened [N, K] weight)
        absmax  fp32 [ceil(N*K/bs)]  double quant undone at export time with the same fp32
                                     arithmetic quantkit's kernels use
                                     (code[q] * nested_absmax[b // 256] + offset)
        attributes K, N, block_size, quant_type (0 = FP4, 1 = NF4)
    MatMulBnb4 has fixed NF4/FP4 tables, so a layer whose stored ``quant_map`` is not the
    standard table is refused.

Why a separate op: ``quantkit::lut4_linear`` carries the code table as a tensor input,
which a translation function sees only as a graph value; the export op
``quantkit_onnx::matmul_bnb4`` takes K/N/block_size/quant_type as integer arguments that
become the node's attributes. Its eager implementation is quantkit's own kernel, so the
swapped model still runs in torch (the exporter only traces it with fake tensors).

``onnx`` does not know com.microsoft schemas; the dynamo exporter needs one to build the
node, so we register a minimal ``MatMulBnb4`` schema with ``onnx.defs`` once per process.

File layout: ``model.onnx`` holds graph and weights in one file when they fit in protobuf's
2 GiB limit, else the weights go to ``model.onnx.data`` next to it (ONNX external data);
plus the artifact's config.json, tokenizer and generation files.

    intk (4-bit codes, offset 8)  ->  com.microsoft::MatMulNBits(A, B, scales) [+ Add(bias)]
        B       uint8 [N, ceil(K/32), 16]  our rows re-blocked (same nibble order: low first),
                                           padding codes 8 (= 0)
        scales  fp32 [N*ceil(K/32)]        the per-row scale repeated per block
        attributes K, N, bits=4, block_size=32 (zero point: the op's default 8)
    int-k otherwise, dualbin, bitstack  ->  a standard-op graph (quantkit/io/onnx_graphs.py)

Adding a format: write ``_<format>_to_onnx(module) -> nn.Module`` (an export-ready module
whose forward calls ops with a translation) and add it to ``ONNX_FORMATS``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from quantkit.errors import FormatError, UsageError
from quantkit.formats import lut4
from quantkit.io.artifact import atomic_output_dir, read_metadata
from quantkit.io.shards import is_weight_file

ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"  # what ONNXProgram.save names external data (only past SINGLE_FILE_LIMIT)
OPSET = 21
SINGLE_FILE_LIMIT = 1_800_000_000  # bytes of initializers; protobuf refuses a message > 2 GiB
BNB4_QUANT_TYPE = {"fp4": 0, "nf4": 1}  # MatMulBnb4's quant_type attribute


# ---------------------------------------------------------------------------------------
# lut4 -> com.microsoft::MatMulBnb4
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("quantkit_onnx::matmul_bnb4", mutates_args=())
def matmul_bnb4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
                K: int, N: int, block_size: int, quant_type: int) -> torch.Tensor:
    """y = x @ W.T (+ bias), W [N, K] nf4 (quant_type 1) / fp4 (0) with fp32 absmax: MatMulBnb4's math."""
    code = lut4.code_table("nf4" if quant_type == 1 else "fp4").to(x.device)
    return torch.ops.quantkit.lut4_linear(x, packed, absmax, code, block_size, N, K, bias, None, None, 0.0, 256)


@matmul_bnb4.register_fake
def _matmul_bnb4_fake(x, packed, absmax, bias, K, N, block_size, quant_type):
    torch._check(x.shape[-1] == K, lambda: f"x has last dim {x.shape[-1]}, weight is {N}x{K}")
    return x.new_empty((*x.shape[:-1], N))


class Bnb4ExportLinear(nn.Module):
    """Export-time stand-in for a Lut4Linear: flat packed bytes + de-nested fp32 absmax."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, bias: Optional[torch.Tensor],
                 in_features: int, out_features: int, block_size: int, quant_type: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.quant_type = block_size, BNB4_QUANT_TYPE[quant_type]
        self.register_buffer("packed", packed.reshape(-1).contiguous())
        self.register_buffer("absmax", absmax.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantkit_onnx.matmul_bnb4(x, self.packed, self.absmax, self.bias, self.in_features,
                                                   self.out_features, self.block_size, self.quant_type)


def _lut4_to_onnx(module) -> nn.Module:
    from quantkit._ops import lut4_decode_absmax

    s = module.state
    if s.quant_type not in BNB4_QUANT_TYPE:
        raise FormatError(f"quant_type {s.quant_type!r} has no MatMulBnb4 equivalent")
    if not torch.equal(module.weight_quant_map.float().cpu(), lut4.code_table(s.quant_type)):
        raise FormatError(f"its quant_map is not the standard {s.quant_type} table (MatMulBnb4 has fixed tables)")
    absmax = lut4_decode_absmax(module.weight_absmax, module.weight_nested_quant_map, module.weight_nested_absmax,
                                float(s.nested_offset), s.nested_blocksize)
    return Bnb4ExportLinear(module.weight, absmax, module.bias, module.in_features, module.out_features,
                            s.blocksize, s.quant_type)


def _translate_matmul_bnb4(x, packed, absmax, bias=None, K: int = 0, N: int = 0, block_size: int = 64,
                           quant_type: int = 1):
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    msft = Opset("com.microsoft", 1)
    y = msft.MatMulBnb4(x, packed, absmax, K=K, N=N, block_size=block_size, quant_type=quant_type)
    if bias is not None:
        y = op.Add(y, bias)
    return y


# ---------------------------------------------------------------------------------------
# int-k, 4-bit codes centred at 8 (LSQ int4) -> com.microsoft::MatMulNBits
# ---------------------------------------------------------------------------------------
NBITS_BLOCK = 32  # MatMulNBits block along K; our scale is per row, so every block of a row repeats it


@torch.library.custom_op("quantkit_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                 K: int, N: int, block_size: int) -> torch.Tensor:
    """y = x @ W.T (+ bias): MatMulNBits' math for bits=4 and no zero points (zero point 8).

    packed uint8 [N, kb, block_size/2], low nibble = earlier element; scales fp32 [N*kb];
    W[n, c] = (code - 8) * scales[n*kb + c // block_size], c < K.
    """
    kb = packed.shape[1]
    flat = packed.reshape(N, kb * block_size // 2)
    codes = torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(N, kb * block_size)[:, :K]
    scale = scales.reshape(N, kb).repeat_interleave(block_size, dim=1)[:, :K]
    w = (codes.float() - 8.0) * scale
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, packed, scales, bias, K, N, block_size):
    torch._check(x.shape[-1] == K, lambda: f"x has last dim {x.shape[-1]}, weight is {N}x{K}")
    return x.new_empty((*x.shape[:-1], N))


class NBitsExportLinear(nn.Module):
    """Export-time stand-in for a 4-bit IntKLinear in MatMulNBits' layout."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor], K: int, N: int):
        super().__init__()
        self.K, self.N = K, N
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantkit_onnx.matmul_nbits(x, self.packed, self.scales, self.bias, self.K, self.N,
                                                    NBITS_BLOCK)


def nbits_layout(packed: torch.Tensor, scale: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantkit int4 rows (uint8 [N, ceil(K/2)], code c in the low nibble of byte c//2 when c
    is even, the high one when odd: MatMulNBits' nibble order already) -> MatMulNBits B
    uint8 [N, kb, 16] and scales fp32 [N*kb], kb = ceil(K/32). Padding codes are 8 (zero)."""
    n = packed.shape[0]
    kb = -(-K // NBITS_BLOCK)
    out = torch.full((n, kb * NBITS_BLOCK // 2), 0x88, dtype=torch.uint8)
    out[:, :packed.shape[1]] = packed
    if K % 2:  # the row's last byte holds one code; its unused high nibble must decode to 0
        out[:, K // 2] = (out[:, K // 2] & 0x0F) | 0x80
    return out.reshape(n, kb, NBITS_BLOCK // 2), scale.float().repeat_interleave(kb)


def _intk_to_onnx(module) -> nn.Module:
    from quantkit.io.onnx_graphs import intk_graph

    s = module.state
    if s.bits == 4 and float(s.offset) == 8.0:
        b, scales = nbits_layout(module.weight.cpu(), module.weight_scale.cpu(), module.in_features)
        return NBitsExportLinear(b, scales, module.bias, module.in_features, module.out_features)
    return intk_graph(module)


def _translate_matmul_nbits(x, packed, scales, bias=None, K: int = 0, N: int = 0, block_size: int = 32):
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    msft = Opset("com.microsoft", 1)
    y = msft.MatMulNBits(x, packed, scales, K=K, N=N, bits=4, block_size=block_size)
    if bias is not None:
        y = op.Add(y, bias)
    return y


def _dequant_graph_modules() -> tuple:
    from quantkit.io.onnx_graphs import DequantMatMul
    return (DequantMatMul,)


def _graph(name: str) -> Callable[[nn.Module], nn.Module]:
    def convert(module):
        from quantkit.io import onnx_graphs
        return getattr(onnx_graphs, name)(module)
    return convert


def _embeddings(name: str) -> Callable[[nn.Module], nn.Module]:
    def convert(module):
        from quantkit.io import onnx_embeddings
        return getattr(onnx_embeddings, name)(module)
    return convert


def _tied_head_to_onnx(module) -> nn.Module:
    """The linear export form of the embedding table a TiedHead reads."""
    from quantkit.io.onnx_embeddings import table_linear_format

    return ONNX_FORMATS[table_linear_format(module)][1](module.embedding)


# format -> (what it becomes, converter(module) -> export-ready module)
ONNX_FORMATS: dict[str, tuple[str, Callable[[nn.Module], nn.Module]]] = {
    "lut4": ("nf4/fp4 as com.microsoft::MatMulBnb4", _lut4_to_onnx),
    "intk": ("int4 (offset 8) as com.microsoft::MatMulNBits; other int-k as a standard-op dequantize + MatMul",
             _intk_to_onnx),
    "dualbin": ("DB-LLM dual-binary as a standard-op unpack + scaled planes + MatMul", _graph("dualbin_graph")),
    "bitstack": ("BitStack (the loaded blocks) as a standard-op unpack + Σ S ⊙ (u v) + MatMul",
                 _graph("bitstack_graph")),
    "dense": ("bf16/fp16 head as Cast + MatMul", _embeddings("DenseLinearExport")),
    "intk_embedding": ("int8 token embedding as Gather of the packed rows + decode", _embeddings("embedding_to_onnx")),
    "lut4_embedding": ("nf4/fp4 token embedding as Gather of the packed nibbles + decode",
                       _embeddings("embedding_to_onnx")),
    "dense_embedding": ("bf16/fp16 token embedding as Gather + Cast", _embeddings("embedding_to_onnx")),
    "tied_head": ("output head tied to the packed embedding, in that table's linear form", _tied_head_to_onnx),
}


def supported_formats() -> dict[str, str]:
    """{module format: what it becomes in the ONNX graph}."""
    return {fmt: desc for fmt, (desc, _) in ONNX_FORMATS.items()}


def _translation_table() -> dict:
    return {torch.ops.quantkit_onnx.matmul_bnb4.default: _translate_matmul_bnb4,
            torch.ops.quantkit_onnx.matmul_nbits.default: _translate_matmul_nbits}


def register_contrib_schemas() -> None:
    """Register the com.microsoft schemas we emit with ``onnx.defs`` (idempotent)."""
    from onnx import defs
    from onnx.defs import OpSchema

    attr = OpSchema.AttrType
    if not defs.has("MatMulNBits", "com.microsoft"):
        defs.register_schema(OpSchema(
            "MatMulNBits", "com.microsoft", 1,
            doc="ONNX Runtime contrib op: Y = A @ dequant(B).T, B k-bit blocks along K, low nibble first.",
            inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                    OpSchema.FormalParameter("scales", "T1")],
            outputs=[OpSchema.FormalParameter("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                              ("T2", ["tensor(uint8)"], "packed weights")],
            attributes=[OpSchema.Attribute("K", attr.INT, "input features"),
                        OpSchema.Attribute("N", attr.INT, "output features"),
                        OpSchema.Attribute("bits", attr.INT, "bits per weight"),
                        OpSchema.Attribute("block_size", attr.INT, "weights per scale along K"),
                        OpSchema.Attribute("accuracy_level", attr.INT, "0 = fp32 compute", required=False)],
        ))
    if defs.has("MatMulBnb4", "com.microsoft"):
        return
    schema = OpSchema(
        "MatMulBnb4", "com.microsoft", 1,
        doc="ONNX Runtime contrib op: Y = A @ dequant(B).T, B nf4/fp4 in bitsandbytes layout.",
        inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("absmax", "T1")],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("T2", ["tensor(uint8)"], "packed weights")],
        attributes=[OpSchema.Attribute("K", attr.INT, "input features"),
                    OpSchema.Attribute("N", attr.INT, "output features"),
                    OpSchema.Attribute("block_size", attr.INT, "weights per absmax block"),
                    OpSchema.Attribute("quant_type", attr.INT, "0 = FP4, 1 = NF4"),
                    OpSchema.Attribute("transB", attr.INT, "B is stored [N, K]", required=False),
                    OpSchema.Attribute("training_mode", attr.INT, "unused", required=False)],
    )
    defs.register_schema(schema)


class _LogitsOnly(nn.Module):
    """input_ids -> logits, no cache: the graph the export traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def prepare_for_onnx(model: nn.Module, modules: dict) -> nn.Module:
    """Swap every packed module (``modules``: the artifact's {name: spec}) for its export form."""
    from quantkit.passes.targets import replace_module

    for name, spec in modules.items():
        fmt = spec.get("format")
        module = model.get_submodule(name)
        try:
            converted = ONNX_FORMATS[fmt][1](module)
        except Exception as e:
            raise FormatError(f"module {name} ({type(module).__name__}, format {fmt}) cannot be exported to onnx: "
                              f"{e}") from e
        replace_module(model, name, converted)
    return model


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress and deprecation chatter; keep stdout clean."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _share_identical_initializers(graph) -> int:
    """Point every use of an initializer at the first one with the same dtype, shape and
    bytes, and drop the copies; returns the bytes saved. A head tied to the packed embedding
    exports as two modules holding the same packed table (the lookup and the head's MatMul);
    without this the .onnx file would carry that table twice."""
    import hashlib

    first, saved = {}, 0
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or value.is_graph_input() or value.is_graph_output():
            continue
        raw = tensor.tobytes()
        key = (str(tensor.dtype), tuple(tensor.shape), len(raw), hashlib.sha256(raw).digest())
        kept = first.setdefault(key, value)
        if kept is value:
            continue
        value.replace_all_uses_with(kept)
        del graph.initializers[name]
        saved += len(raw)
    return saved


def export_onnx(out_dir: Union[str, Path], dest: Union[str, Path], overwrite: bool = False,
                memory_budget: Union[int, str, None] = None) -> Path:
    """Write ``dest``: ``model.onnx`` (input_ids -> logits) plus config and tokenizer files.

    memory_budget: export the model as ``load(out_dir, memory_budget=...)`` loads it."""
    from quantkit.io.export_checks import check_export_paths, check_exportable
    from quantkit.io.artifact import load

    out_dir, dest = check_export_paths(out_dir, dest, overwrite)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(f"onnx export needs the onnx and onnxscript packages ({e}); "
                         "pip install onnx onnxscript (onnxruntime to run the result)") from None
    info = read_metadata(out_dir)
    check_exportable(info["modules"], "onnx", supported_formats())
    model = load(out_dir, memory_budget=memory_budget).float()  # fp32 graph (norms, embeddings) whatever the source dtype; packed bytes untouched
    model = prepare_for_onnx(model, info["modules"])
    # The exporter's optimizer constant-folds small initializer-only subgraphs, which would
    # write a dequantized fp32 weight into the file; formats decoded by a standard-op graph
    # therefore export unoptimized (ONNX Runtime optimizes the graph when it loads it).
    optimize = not any(isinstance(m, _dequant_graph_modules()) for m in model.modules())
    model.config.use_cache = False
    register_contrib_schemas()

    wrapper = _LogitsOnly(model).eval()
    example = torch.zeros((2, 8), dtype=torch.long)
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=4096),
                          1: torch.export.Dim("sequence", min=1, max=1 << 20)}}
    with _quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(wrapper, (example,), dynamo=True, input_names=["input_ids"],
                                        output_names=["logits"], dynamic_shapes=dims, opset_version=OPSET,
                                        custom_translation_table=_translation_table(), external_data=False,
                                        optimize=optimize, verbose=False, report=False)
        except Exception as e:
            raise FormatError(f"torch.onnx export of {type(model).__name__} failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    _share_identical_initializers(program.model.graph)
    init_bytes = sum(int(v.const_value.nbytes) for v in program.model.graph.initializers.values()
                     if v.const_value is not None)
    external = init_bytes > SINGLE_FILE_LIMIT
    for node in program.model.graph.all_nodes():  # exporter debug info (stack traces): ~1 KB per node
        node.metadata_props.clear()
    program.model.metadata_props.update({"quantkit.source": str(out_dir.name),
                                         "quantkit.inputs": "input_ids int64 [batch, sequence]",
                                         "quantkit.outputs": "logits float32 [batch, sequence, vocab]",
                                         "quantkit.past_key_values": "none"})
    with atomic_output_dir(dest, overwrite) as tmp:
        with _quiet_exporter():
            program.save(str(tmp / ONNX_NAME), external_data=external)
        for p in sorted(out_dir.iterdir()):
            if is_weight_file(p.name) or p.name.startswith("."):
                continue
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
            else:
                shutil.copy2(p, tmp / p.name)
    return dest
