"""Modules that hold packed weights, and the table used to rebuild them when loading.

Each packed module class provides ``spec() -> dict`` (JSON-able: everything needed to
build an empty instance) and ``from_spec(spec, device)``; artifacts store the specs in
their safetensors metadata, so loading never guesses a format from tensor names.
"""

from quantkit.nn.bitstack_linear import BitStackLinear
from quantkit.nn.dense_linear import DenseLinear
from quantkit.nn.dualbin_linear import DualBinLinear
from quantkit.nn.intk_linear import IntKLinear
from quantkit.nn.lut4_linear import Lut4Linear
from quantkit.nn.packed_embedding import (EMBEDDINGS, TIED_HEAD, DenseEmbedding, IntKEmbedding, Lut4Embedding,
                                          TiedHead, bind_tied_heads)

PACKED_MODULES = {"lut4": Lut4Linear, "intk": IntKLinear, "dualbin": DualBinLinear, "bitstack": BitStackLinear,
                  "dense": DenseLinear, **EMBEDDINGS, TIED_HEAD: TiedHead}

__all__ = ["EMBEDDINGS", "TIED_HEAD", "BitStackLinear", "DenseEmbedding", "DenseLinear", "DualBinLinear", "IntKEmbedding", "IntKLinear",
           "Lut4Embedding", "Lut4Linear", "PACKED_MODULES", "TiedHead", "bind_tied_heads"]
