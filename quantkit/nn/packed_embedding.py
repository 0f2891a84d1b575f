"""Token embeddings held packed, and an output head that reads the same packed table.

An embedding table [num_embeddings, embedding_dim] has the shape of a linear weight
[out_features, in_features], so each packed embedding here *is* the packed linear of its
format (same buffers, state-dict keys, spec fields and kernels) with a different forward:
a lookup that decodes only the gathered rows (``torch.ops.quantkit.intk_embedding`` /
``lut4_embedding``; the whole table is never dequantized).

    IntKEmbedding   format "intk_embedding": int8 codes + fp32 scale per row (IntKLinear)
    Lut4Embedding   format "lut4_embedding": nf4/fp4 blockwise, bnb layout (Lut4Linear)
    DenseEmbedding  format "dense_embedding": bf16/fp16 table (DenseLinear)

Each keeps ``embed_scale`` (Gemma multiplies the looked-up rows by sqrt(hidden); 1.0
elsewhere) and returns rows in the model's floating dtype (``out_dtype``, fp32 unless the
model is cast), computed as rows (fp32) · embed_scale, then cast.

``TiedHead`` (format "tied_head") is the output head of a model whose head shares the
embedding's weight (``tie_word_embeddings``): it holds no tensors of its own and computes
``x @ table.T`` with the embedding's packed tensors through the format's linear op, so a
tied table is stored, loaded and held once. Its spec names the embedding (``tied_to``);
``bind_tied_heads`` links it after loading.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from quantkit.errors import FormatError
from quantkit.nn.dense_linear import DenseLinear
from quantkit.nn.intk_linear import IntKLinear
from quantkit.nn.lut4_linear import Lut4Linear

TIED_HEAD = "tied_head"


class _TableLookup:
    """The embedding side of a packed table class (mixed in before the format's linear)."""

    FORMAT: str = ""
    embed_scale: float = 1.0
    padding_idx: Optional[int] = None
    out_dtype: torch.dtype = torch.float32

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def set_embedding(self, embed_scale: float = 1.0, padding_idx: Optional[int] = None,
                      out_dtype: torch.dtype = torch.float32):
        self.embed_scale = float(embed_scale)
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype
        return self

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:  # fp32 [*ids.shape, embedding_dim]
        raise NotImplementedError

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [...] -> [..., embedding_dim] in ``out_dtype``."""
        rows = self._rows(ids)
        if self.embed_scale != 1.0:
            rows = rows * torch.tensor(self.embed_scale, dtype=torch.float32)
        return rows.to(self.out_dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., embedding_dim] @ table.T -> [..., num_embeddings]: the tied output head."""
        return super().forward(x)  # the format's linear forward (next class in the MRO)

    def bound_forward(self):
        """The lookup itself (it runs once per step; nothing to bind)."""
        return self

    def bound_project(self):
        """``project`` with its op arguments resolved once: the format linear's bound forward."""
        return super().bound_forward()

    def spec(self) -> dict:
        spec = super().spec()
        spec.update(format=self.FORMAT, embed_scale=self.embed_scale, padding_idx=self.padding_idx)
        return spec

    @classmethod
    def from_spec(cls, spec: dict, device="meta"):
        mod = super().from_spec(spec, device=device)
        try:
            pad = spec.get("padding_idx")
            return mod.set_embedding(float(spec.get("embed_scale", 1.0)), None if pad is None else int(pad))
        except (TypeError, ValueError) as e:
            raise FormatError(f"bad {cls.FORMAT} module spec {spec}: {e}") from None

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        # the packed tensors keep their dtypes; what a cast changes is the dtype rows come out in
        self.out_dtype = fn(torch.empty(0, dtype=self.out_dtype)).dtype
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, embed_scale={self.embed_scale:g}"


class IntKEmbedding(_TableLookup, IntKLinear):
    FORMAT = "intk_embedding"

    def _rows(self, ids):
        s = self.state
        return torch.ops.quantkit.intk_embedding(ids, self.weight, self.weight_scale, s.bits, s.offset,
                                                 self.out_features, self.in_features)


class Lut4Embedding(_TableLookup, Lut4Linear):
    FORMAT = "lut4_embedding"

    def _rows(self, ids):
        packed, absmax, code, a_code, a_scale, a_off, a_bs = self._op_weight_args()
        return torch.ops.quantkit.lut4_embedding(ids, packed, absmax, code, self.state.blocksize,
                                                 self.out_features, self.in_features, a_code, a_scale, a_off, a_bs)


class DenseEmbedding(_TableLookup, DenseLinear):
    FORMAT = "dense_embedding"

    def _rows(self, ids):
        return F.embedding(ids, self.weight).float()


EMBEDDINGS = {c.FORMAT: c for c in (IntKEmbedding, Lut4Embedding, DenseEmbedding)}


class TiedHead(nn.Module):
    """Output head y = x @ E.T for the packed embedding E it is tied to (no tensors of its own).

    The embedding is referenced, not registered as a submodule, so state_dict, parameters()
    and memory accounting see the table once, under the embedding's name."""

    def __init__(self, in_features: int, out_features: int, tied_to: str, embedding: Optional[_TableLookup] = None):
        super().__init__()
        self.in_features, self.out_features, self.tied_to = in_features, out_features, tied_to
        self._table = [embedding]  # a list: keeps nn.Module from registering it

    def bind(self, embedding: _TableLookup) -> None:
        if not isinstance(embedding, _TableLookup) or (embedding.num_embeddings, embedding.embedding_dim) != (
                self.out_features, self.in_features):
            raise FormatError(f"tied head ({self.out_features}x{self.in_features}) cannot read {self.tied_to} "
                              f"({type(embedding).__name__})")
        self._table[0] = embedding

    @property
    def embedding(self) -> _TableLookup:
        if self._table[0] is None:
            raise FormatError(f"tied head is not bound to its embedding {self.tied_to} (bind_tied_heads)")
        return self._table[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.project(x)

    def bound_forward(self):
        return self.embedding.bound_project()

    def dequantized_weight(self) -> torch.Tensor:
        return self.embedding.dequantized_weight()

    def bits_per_weight(self) -> float:
        return 0.0  # its bytes are the embedding's

    def spec(self) -> dict:
        return {"format": TIED_HEAD, "format_version": 1, "tied_to": self.tied_to, "in_features": self.in_features,
                "out_features": self.out_features, "bits_per_weight": 0.0}

    @classmethod
    def from_spec(cls, spec: dict, device="meta") -> "TiedHead":
        try:
            return cls(int(spec["in_features"]), int(spec["out_features"]), str(spec["tied_to"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"bad {TIED_HEAD} module spec {spec}: {e}") from None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied_to={self.tied_to}"


def bind_tied_heads(model: nn.Module) -> None:
    """Link every TiedHead of ``model`` to the embedding its spec names (after loading)."""
    for m in model.modules():
        if isinstance(m, TiedHead):
            m.bind(model.get_submodule(m.tied_to))
