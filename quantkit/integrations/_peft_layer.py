"""The peft LoRA layer for quantkit's packed linears (imports peft; loaded by peft_lora).

``PackedLoraLinear`` is peft's ``lora.Linear`` with the parts that touch the base weight
replaced, so everything else (adapter bookkeeping, dropout, scaling, multiple adapters,
mixed-batch inference, state-dict keys, save/load) is peft's own code:

    forward       base(x) through the packed kernel (gradients flow to x through the op's
                  chunked backward, quantkit/_row_chunks.py) + scaling · B(A(dropout(x)))
    adapters      created fp32 whatever the base (peft would cast them to the base's
                  "weight" dtype: uint8 codes, or bf16 for a dense base)
    DoRA          ``PackedDoraLayer``: the row norms ||W + s·B·A|| are built a chunk of rows at
                  a time from the packed weight (peft's DoRA dequantizes W whole every step)
    merge         dequantize, add the deltas (DoRA: scale rows), re-pack in the same format
                  and spec; refused for dual-binary and BitStack (_packed_weights.merge_refusal)
                  (``merge_kept``: the share of the weight change the re-packing kept; a
                  warning when below half, as with a realistic adapter on a 4-bit base)
    unmerge       exact: restores the packed tensors kept when the first adapter was merged

Shapes: x [..., in_features] -> [..., out_features]; lora_A [r, in], lora_B [out, r] fp32.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import Linear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from quantkit.errors import UsageError
from quantkit.integrations import _packed_weights as pw

# init_lora_weights values that only initialise A and B; the others (pissa, olora, loftq,
# corda, ...) read or rewrite the dense base weight
PLAIN_INITS = (True, False, "gaussian")


class PackedDoraLayer(DoraLinearLayer):
    """DoRA magnitude (``weight``: fp32 [out]) on a packed base, weight norms chunk by chunk."""

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        norm = pw.row_norms(base_layer, lora_A, lora_B, scaling)
        self.weight = nn.Parameter(norm.cpu() if place_on_cpu else norm, requires_grad=True)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        """The DoRA term added to ``base_result`` (= base(x) incl. bias; None: dropout is on,
        recompute base on the dropped-out x), as peft's DoraLinearLayer.forward."""
        # detached, as the DoRA paper (section 4.3) and peft do: the norm gets no gradient
        weight_norm = pw.row_norms(base_layer, lora_A.weight, lora_B.weight, scaling)
        mag_norm_scale = (self.weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:
            base_result = base_layer(x)
        bias = base_layer.bias
        if bias is not None:
            base_result = base_result - bias
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def __repr__(self) -> str:
        return "quantkit." + super().__repr__()


class PackedDoraVariant(DoraLinearVariant):
    """peft's DoRA variant with ``PackedDoraLayer`` as the magnitude module; merging goes
    through ``PackedLoraLinear.merge``."""

    @staticmethod
    def init(module: "PackedLoraLinear", adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        dora = PackedDoraLayer(fan_in_fan_out=False)
        dora.update_layer(base_layer=module.get_base_layer(), lora_A=module.lora_A[adapter_name].weight,
                          lora_B=module.lora_B[adapter_name].weight, scaling=module.scaling[adapter_name])
        module.lora_magnitude_vector[adapter_name] = dora


class PackedLoraLinear(Linear):
    """LoRA on a quantkit packed linear (Lut4Linear, IntKLinear, DualBinLinear, BitStackLinear,
    DenseLinear). Built by peft's custom-module dispatch; the base stays packed and frozen."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 parameter_name: Optional[str] = None, **kwargs) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if isinstance(base, pw.PACKED_EMBEDDINGS):
            raise UsageError(f"LoRA on a packed embedding table ({type(base).__name__}) is not supported; "
                             "target the linear layers (e.g. q_proj, v_proj)")
        if parameter_name is not None:
            raise UsageError("LoraConfig(target_parameters=...) is not supported on quantkit packed layers: "
                             "they hold no nn.Parameter weight; use target_modules")
        if config.fan_in_fan_out:
            raise UsageError("fan_in_fan_out=True does not apply to quantkit packed linears (their weight is "
                             "[out_features, in_features], as nn.Linear's); leave it False")
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)
        self._unmerged_packed: Optional[dict] = None
        self.merge_kept: Optional[float] = None  # set by merge()

    # --- what peft reads from nn.Linear --------------------------------------------------------
    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # device of the packed tensors; no dtype, so the adapters stay fp32
        t = next(iter(base_layer.buffers()), None)
        return (None if t is None else t.device), None

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:
            raise UsageError(f"quantkit packed layers support plain LoRA and DoRA (use_dora=True) only: {e}") from None

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): PackedDoraVariant}

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs) -> None:
        init = config.init_lora_weights
        if not any(init is p if isinstance(p, bool) else init == p for p in PLAIN_INITS):
            raise UsageError(f"init_lora_weights={init!r} reads or rewrites the dense base weight and is not "
                             "supported on quantkit packed layers; use True, False or 'gaussian'")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # --- merge / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Re-pack base + the adapters' deltas in the base's own format (see the module docstring)."""
        new = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not new:
            return
        base = self.get_base_layer()
        refusal = pw.merge_refusal(base)
        if refusal is not None:
            raise UsageError(refusal)
        names = list(self.merged_adapters) + new
        if self.merged_adapters:  # rebuild from the unmerged base, so DoRA norms see it as forward does
            pw.restore(base, self._unmerged_packed)
        else:
            self._unmerged_packed = pw.snapshot(base)
        w0 = w = base.dequantized_weight().float()
        bias = None if base.bias is None else base.bias.detach().float().clone()
        for a in names:
            delta = self.get_delta_weight(a).float()
            if a in self.lora_variant:  # DoRA: rows scaled by magnitude / ||W + delta||
                norm = pw.row_norms(base, self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a])
                w = (self.lora_magnitude_vector[a].weight.detach().float() / norm).view(-1, 1) * (w + delta)
            else:
                w = w + delta
            if self.lora_bias[a]:
                if bias is None:
                    raise UsageError("cannot merge a LoRA adapter with lora_bias=True: the base layer has no bias")
                bias += self.lora_B[a].bias.detach().float() * self.scaling[a]
        if safe_merge and not (torch.isfinite(w).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights; the adapter(s) {new} seem to be broken")
        pw.repack(base, w)
        if bias is not None:
            base.bias.data.copy_(bias.to(base.bias.dtype))
        self.merged_adapters = names
        # how much of the weight change survived the re-packing: 1 - |repacked - (W + delta)| / |delta|
        change = (w - w0).norm()
        self.merge_kept = float(1 - (base.dequantized_weight().float() - w).norm() / change) if change > 0 else 1.0
        _warn_if_lossy(base, self.merge_kept)

    def unmerge(self) -> None:
        """Put back the packed base exactly as it was before the first merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        pw.restore(self.get_base_layer(), self._unmerged_packed)
        self._unmerged_packed = None
        self.merged_adapters = []

    def __repr__(self) -> str:
        return "quantkit." + super().__repr__()


_warned: set = set()


def _warn_if_lossy(base: nn.Module, kept: float) -> None:
    """Warn (once per format and process) when re-packing lost most of an adapter's weight change."""
    fmt = base.spec()["format"]
    if kept >= 0.5 or fmt in _warned:
        return
    _warned.add(fmt)
    warnings.warn(f"merging a LoRA adapter into {fmt} re-packed W + delta and kept only {kept:.0%} of the adapter's "
                  f"weight change in {type(base).__name__}({base.in_features} -> {base.out_features}): the delta is "
                  "mostly smaller than the format's rounding step, so the merged model is close to the base. Serve "
                  "base + adapter unmerged for the fine-tuned behaviour (docs/peft.md, 'Merging'); "
                  "unmerge_adapter() restores the base exactly.", UserWarning, stacklevel=4)


def custom_modules() -> dict:
    """peft's custom-module mapping: every packed linear class -> ``PackedLoraLinear``."""
    return {cls: PackedLoraLinear for cls in pw.PACKED_LINEARS}
