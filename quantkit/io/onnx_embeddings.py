"""ONNX forms of the packed token embedding and the head tied to it (embeddings pass).

The table stays packed in the .onnx file; the graph gathers the rows of the input ids and
decodes only those, with the fp32 arithmetic of the ops' pure-torch references
(quantkit/_ops_embedding.py), so logits agree with quantkit's:

    intk_embedding   codes uint8 [V, D] --Gather(ids)--> --(Sub offset, Mul scale[ids])--> rows
    lut4_embedding   element e = id·D + c: byte = packed[e // 2] --Gather--> nibble (high when e
                     is even) --Gather code--> × absmax[e // blocksize] (de-nested at export) --> rows
    dense_embedding  bf16/fp16 table --Gather--> Cast fp32
then rows × embed_scale. Integer steps use Div/Mod (no shifts: see onnx_graphs._bits).

A ``tied_head`` exports as its embedding's linear form (int8: the standard-op dequantize +
MatMul of onnx_graphs; nf4/fp4: com.microsoft::MatMulBnb4; bf16/fp16: Cast + MatMul), so
the graph reads the same initializers for the lookup and the head.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import FormatError


class _RowsExport(nn.Module):
    """Base: forward(ids) = decode(rows of ids) · embed_scale, fp32 [..., D]."""

    def __init__(self, embed_scale: float, cols: int):
        super().__init__()
        self.embed_scale, self.cols = float(embed_scale), int(cols)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.decode(ids)
        return rows * self.embed_scale if self.embed_scale != 1.0 else rows


class IntKEmbeddingExport(_RowsExport):
    def __init__(self, module):
        super().__init__(module.embed_scale, module.in_features)
        if module.state.bits != 8:
            raise FormatError(f"int-k embeddings export with 8-bit codes only, got {module.state.bits}")
        self.offset = float(module.state.offset)
        self.register_buffer("codes", module.weight.detach().contiguous())
        self.register_buffer("scale", module.weight_scale.detach().float().contiguous())

    def decode(self, ids):
        return (self.codes[ids].float() - self.offset) * self.scale[ids].unsqueeze(-1)


class Lut4EmbeddingExport(_RowsExport):
    def __init__(self, module):
        from quantkit._ops import lut4_decode_absmax

        super().__init__(module.embed_scale, module.in_features)
        s = module.state
        self.blocksize = int(s.blocksize)
        self.register_buffer("packed", module.weight.detach().reshape(-1).contiguous())
        self.register_buffer("code", module.weight_quant_map.detach().float().contiguous())
        self.register_buffer("absmax", lut4_decode_absmax(module.weight_absmax, module.weight_nested_quant_map,
                                                          module.weight_nested_absmax, float(s.nested_offset),
                                                          s.nested_blocksize).float().contiguous())

    def decode(self, ids):
        e = ids.unsqueeze(-1) * self.cols + torch.arange(self.cols, device=ids.device)
        byte = self.packed[torch.div(e, 2, rounding_mode="floor")].to(torch.int64)
        high = torch.div(byte, 16, rounding_mode="floor")
        nibble = torch.where(torch.remainder(e, 2) == 0, high, byte - 16 * high)
        return self.code[nibble] * self.absmax[torch.div(e, self.blocksize, rounding_mode="floor")]


class DenseEmbeddingExport(_RowsExport):
    def __init__(self, module):
        super().__init__(module.embed_scale, module.in_features)
        self.register_buffer("table", module.weight.detach().contiguous())

    def decode(self, ids):
        return self.table[ids].float()


class DenseLinearExport(nn.Module):
    """y = x @ W.float().T + b for a bf16/fp16-held weight (Cast + MatMul)."""

    def __init__(self, module):
        super().__init__()
        self.register_buffer("weight", module.weight.detach().contiguous())
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float().contiguous())

    def forward(self, x):
        y = x.float() @ self.weight.float().T
        return (y + self.bias if self.bias is not None else y).to(x.dtype)


def embedding_to_onnx(module) -> nn.Module:
    return {"intk_embedding": IntKEmbeddingExport, "lut4_embedding": Lut4EmbeddingExport,
            "dense_embedding": DenseEmbeddingExport}[module.FORMAT](module)


def table_linear_format(module) -> str:
    """The linear format whose converter exports the table a TiedHead ``module`` reads."""
    return {"intk_embedding": "intk", "lut4_embedding": "lut4", "dense_embedding": "dense"}[module.embedding.FORMAT]