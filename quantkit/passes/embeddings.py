"""The ``embeddings`` pass: store the token embedding and the output head packed or narrower.

On small models these two tables are most of the artifact: SmolLM2-135M's tied 49152×576
table is 113 MB in fp32 next to 55 MB of nf4 linears, Gemma-3-270M's 262144×640 table is
671 MB. The pass rewrites

* the input embedding (``model.get_input_embeddings()``, an ``nn.Embedding`` or Gemma's
  scaled subclass) into a packed table whose lookup decodes only the gathered rows
  (quantkit/nn/packed_embedding.py), and
* the output head (``model.get_output_embeddings()``, an ``nn.Linear``) into the packed
  linear of the same format; when the model ties the head to the embedding (transformers'
  tied-weights map, ``tie_word_embeddings``) and both keys ask for the same format, the head
  becomes a ``TiedHead`` that reads the embedding's packed table: stored and held once.

Formats (keys ``embed`` / ``head``):
    keep      leave the table as it is (fp32)
    bfloat16  / float16: the table rounded once and held in 16 bits (each head call widens it)
    int8      int-k codes, 8 bits, one fp32 scale per row (symmetric round-to-nearest)
    nf4 / fp4 the bitsandbytes 4-bit layout with ``blocksize`` / ``double_quant``
Asking a tied head for another format than the embedding unties it (the head is packed from
the same weights on its own; the artifact then holds both).

Runs on the whole model or per streaming unit (``scope``): the embedding and the head are
separate units there, and the head's decision depends only on the model's structure and
the config, so an interrupted and resumed compress writes the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal, Optional

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.formats import intk, lut4
from quantkit.nn.dense_linear import DenseLinear
from quantkit.nn.intk_linear import IntKLinear
from quantkit.nn.lut4_linear import Lut4Linear
from quantkit.nn.packed_embedding import DenseEmbedding, IntKEmbedding, Lut4Embedding, TiedHead
from quantkit.passes.targets import replace_module

TableFormat = Literal["keep", "bfloat16", "float16", "int8", "nf4", "fp4"]


@dataclass(frozen=True)
class EmbeddingsPassConfig:
    """Recipe keys of the embeddings pass.

    embed: storage of the input token embedding (keep | bfloat16 | float16 | int8 | nf4 | fp4).
    head: storage of the output head (same choices); a head tied to the embedding with the
        same format is stored once, as the embedding.
    blocksize / double_quant: the nf4/fp4 block layout (as the nf4 pass; used only by nf4/fp4).
    """

    embed: TableFormat = "int8"
    head: TableFormat = "int8"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self) -> None:
        lut4.check_blocksize(self.blocksize)


def _name_of(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _in_scope(name: Optional[str], scope: str) -> bool:
    return name is not None and (not scope or name == scope or name.startswith(scope + "."))


def _embed_scale(emb: nn.Embedding) -> float:
    """The factor the module's forward multiplies looked-up rows by (Gemma: sqrt(hidden))."""
    if type(emb).forward is nn.Embedding.forward:
        scale = 1.0
    elif isinstance(getattr(emb, "embed_scale", None), (torch.Tensor, float, int)):
        scale = float(emb.embed_scale)  # Gemma3TextScaledWordEmbedding: rows * embed_scale
    else:
        raise UsageError(f"embeddings pass: {type(emb).__name__} has a forward of its own that quantkit does not "
                         f"know; set embed: keep")
    if emb.max_norm is not None or emb.sparse:
        raise UsageError(f"embeddings pass: {type(emb).__name__} uses max_norm/sparse lookups; set embed: keep")
    return scale


def _tied(model: nn.Module, emb_name: Optional[str], head_name: Optional[str], head, emb) -> bool:
    """Whether the model's head shares the embedding's weight, from its declared tie map
    (transformers' ``all_tied_weights_keys``; valid on a meta skeleton and per streaming
    unit), else from tensor identity."""
    if emb_name is None or head_name is None:
        return False
    ties = getattr(model, "all_tied_weights_keys", None)
    if isinstance(ties, dict) and ties:
        return ties.get(f"{head_name}.weight") == f"{emb_name}.weight"
    return getattr(head, "weight", None) is getattr(emb, "weight", None)


def _packed_table(cls_by_fmt: dict, fmt: str, weight: torch.Tensor, bias, cfg: EmbeddingsPassConfig) -> nn.Module:
    """A packed module of class ``cls_by_fmt[kind]`` holding ``weight`` [rows, cols] in ``fmt``."""
    if fmt == "int8":
        return cls_by_fmt["intk"].from_packed(intk.quantize_rows(weight.data, 8), bias)
    if fmt in ("nf4", "fp4"):
        rows, cols = weight.shape
        like_linear = SimpleNamespace(weight=weight, bias=bias, in_features=cols, out_features=rows)
        return cls_by_fmt["lut4"].from_linear(like_linear, fmt, cfg.blocksize, cfg.double_quant)
    return cls_by_fmt["dense"].from_weight(weight.data, fmt, bias)


_EMBEDDING_CLASSES = {"intk": IntKEmbedding, "lut4": Lut4Embedding, "dense": DenseEmbedding}
_HEAD_CLASSES = {"intk": IntKLinear, "lut4": Lut4Linear, "dense": DenseLinear}


def apply(model: nn.Module, cfg: EmbeddingsPassConfig, progress: bool = True, scope: str = "") -> list[str]:
    """Pack the embedding and/or head of ``model`` in place (those inside ``scope``); returns
    the names of the modules replaced."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []  # no token embedding (e.g. a plain MLP): nothing for this pass (PassSpec.may_match_nothing)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_name, head_name = _name_of(model, emb), _name_of(model, head)
    tied = _tied(model, emb_name, head_name, head, emb)
    done = []
    if cfg.embed != "keep" and _in_scope(emb_name, scope) and type(emb) not in _EMBEDDING_CLASSES.values():
        if not isinstance(emb, nn.Embedding):
            raise UsageError(f"embeddings pass: {emb_name} is a {type(emb).__name__}, not an nn.Embedding; "
                             f"set embed: keep")
        scale = _embed_scale(emb)
        new = _packed_table(_EMBEDDING_CLASSES, cfg.embed, emb.weight, None, cfg)
        new.set_embedding(scale, emb.padding_idx, out_dtype=emb.weight.dtype)
        replace_module(model, emb_name, new)
        done.append(emb_name)
    if head is None or not _in_scope(head_name, scope) or isinstance(head, TiedHead):
        return done
    if tied and cfg.head == cfg.embed and cfg.embed != "keep":
        out_f, in_f = head.weight.shape
        new_head = TiedHead(in_f, out_f, emb_name)
        table = model.get_submodule(emb_name)
        if table.weight.device.type != "meta":  # streaming releases the embedding's unit before the head's
            new_head.bind(table)
        replace_module(model, head_name, new_head)
        done.append(head_name)
    elif cfg.head != "keep":
        if type(head) is not nn.Linear:
            raise UsageError(f"embeddings pass: the output head {head_name} is a {type(head).__name__}, not an "
                             f"nn.Linear; set head: keep")
        replace_module(model, head_name, _packed_table(_HEAD_CLASSES, cfg.head, head.weight, head.bias, cfg))
        done.append(head_name)
    return done
