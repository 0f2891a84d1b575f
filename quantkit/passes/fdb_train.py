"""Training-time pieces of the DB-LLM pass: the FDB linear and the distillation losses.

``FDBTrainLinear`` holds a latent fp32 weight W [N, K] and learnable per-group scales
alpha1, alpha2 [N, G]. Each forward re-derives the bit planes from W (nearest of the four
levels {0, a2, a1, a1+a2}, see formats/dualbin.encode) and uses

    W_hat = a1 * b1 + a2 * b2                                    (grads reach a1, a2)
    W_ste = W_hat + (W - W.detach())                             (identity STE to W)

so dL/da1 = sum over the group of dL/dW_hat * b1 (likewise a2) and dL/dW = dL/dW_hat.
The identity straight-through estimator is what the community FDB code uses
(algorithms.md §1.1 [D]); the paper's choice is not known.

Losses (per token t, teacher p_T, student p_S over the vocabulary, temperature tau):
    kl_t = sum_v p_T log(p_T / p_S)
    KD : mean_t kl_t
    DAD: sum_t w_t kl_t / sum_t w_t, w_t = f(H_T(t), H_S(t)) detached
The DB-LLM paper's weighting formula is NOT known to us (algorithms.md §1.2); the weight
functions below are our own choices, named for what they compute, never "the paper's".
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats import dualbin


class TrainingDiverged(QuantkitError):
    """The distillation (or block reconstruction) loss or its gradient became NaN/Inf."""


def nearest_bits(w: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b1, b2) as w.dtype {0,1}, the nearest of the levels (0, a2, a1, a1+a2) to each w,
    ties to the earlier level: the same choice as formats/dualbin.encode (argmin), written
    as comparisons so no [.., 4] temporary is built (this runs on every weight each step)."""
    d0, d1 = w.abs(), (w - a2).abs()
    d2, d3 = (w - a1).abs(), (w - a1 - a2).abs()
    b1 = torch.minimum(d2, d3) < torch.minimum(d0, d1)
    b2 = torch.where(b1, d3 < d2, d1 < d0)
    return b1.to(w.dtype), b2.to(w.dtype)


def nearest_bits_ordered(w: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_bits in ~1/3 of the passes over the weight when every group's levels are in
    FDB's order: 0 and a1+a2 between a2 and a1 (a1 = 2s, a2 = -s at init, either sign of s).
    Mirroring w and the levels by sign(a1) makes them increasing (a2 < 0 < a1+a2 < a1), so
    three midpoint compares give the bits. Falls back to nearest_bits otherwise. Exact
    midpoint ties may resolve differently from nearest_bits (irrelevant for training;
    packing uses formats/dualbin.encode)."""
    sgn = torch.where(a1 < 0, -1.0, 1.0).to(w.dtype)
    m1, m2 = a1 * sgn, a2 * sgn
    if not bool(((m2 < 0) & (m1 + m2 > 0)).all()):
        return nearest_bits(w, a1, a2)
    ws = w * sgn
    b1 = ws > (m1 + m2) / 2
    b2 = torch.where(b1, ws < m1 + m2 / 2, ws < m2 / 2)
    return b1.to(w.dtype), b2.to(w.dtype)


class _FDBQuant(torch.autograd.Function):
    """W_hat = a1*b1 + a2*b2 with bits from nearest_bits; backward: identity STE to W,
    sum of grad*b over the group to each alpha. Saves only the two bool planes (the
    generic autograd graph of the same expression keeps several fp32 weight-sized tensors,
    which dominated a training step on CPU)."""

    @staticmethod
    def forward(ctx, wg, a1, a2):  # wg [N, G, group]; a1, a2 [N, G]
        b1, b2 = nearest_bits_ordered(wg, a1.unsqueeze(-1), a2.unsqueeze(-1))
        ctx.save_for_backward(b1.bool(), b2.bool())
        return a1.unsqueeze(-1) * b1 + a2.unsqueeze(-1) * b2

    @staticmethod
    def backward(ctx, grad):
        b1, b2 = ctx.saved_tensors
        g_a1 = (grad * b1).sum(-1) if ctx.needs_input_grad[1] else None
        g_a2 = (grad * b2).sum(-1) if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), g_a1, g_a2


class FDBTrainLinear(nn.Module):
    """Trainable Flexible Dual Binarization of one nn.Linear (training only, not saved)."""

    def __init__(self, linear: nn.Linear, group: int = 64, init: str = "mse", train_weight: bool = True):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features, self.group = w.shape[1], w.shape[0], group
        self.state = dualbin.DualBinState(tuple(w.shape), group, str(linear.weight.dtype).removeprefix("torch."))
        s = dualbin.init_step(w, group, init)
        self.weight = nn.Parameter(w.clone(), requires_grad=train_weight)
        self.alpha1 = nn.Parameter(2 * s)
        self.alpha2 = nn.Parameter(-s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _grouped_weight(self) -> torch.Tensor:
        n, k = self.weight.shape
        g = self.state.n_groups
        return F.pad(self.weight, (0, g * self.group - k)).view(n, g, self.group)

    def quantized_weight(self) -> torch.Tensor:
        """W_ste [N, K] fp32: dual-binarized values, gradients to alphas and (STE) to W."""
        n, k = self.weight.shape
        w_hat = _FDBQuant.apply(self._grouped_weight(), self.alpha1, self.alpha2)
        return w_hat.reshape(n, -1)[:, :k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)  # .to: no-op for fp32 / autocast

    @torch.no_grad()
    def pack(self) -> dualbin.DualBinWeight:
        """Round the scales to fp16, choose the nearest-level bits for them, pack."""
        a1, a2 = self.alpha1.half(), self.alpha2.half()
        b1, b2 = dualbin.encode(self.weight.detach().float(), a1, a2, self.group)
        return dualbin.pack(b1, b2, a1, a2, self.state.shape, self.group, self.state.dtype)


# ---- DAD token weights: f(H_T, H_S) -> w >= 0, all [tokens], entropies in nats ---------------
def _uniform(h_t: torch.Tensor, h_s: torch.Tensor, gamma: float) -> torch.Tensor:
    return torch.ones_like(h_t)


def _mean_entropy(h_t: torch.Tensor, h_s: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 + (H_T + H_S)/2)^gamma: up-weights tokens on which either model is unsure
    ("ambiguous samples"); the +1 keeps confident tokens in the loss."""
    return (1 + 0.5 * (h_t + h_s)).pow(gamma)


def _entropy_gap(h_t: torch.Tensor, h_s: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 + |H_S - H_T|)^gamma: up-weights tokens whose uncertainty the student distorts."""
    return (1 + (h_s - h_t).abs()).pow(gamma)


DAD_WEIGHTS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "uniform": _uniform,            # == plain KD
    "mean_entropy": _mean_entropy,
    "entropy_gap": _entropy_gap,
}


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight_fn: str = "uniform",
                 gamma: float = 1.0, temperature: float = 1.0,
                 weight_norm: Callable[[torch.Tensor], torch.Tensor] = lambda total: total) -> tuple[torch.Tensor, dict]:
    """Token-weighted KL(teacher || student) over logits [..., V] (any float dtype; math in fp32).

    The weighted sum is divided by ``weight_norm(sum of this batch's token weights)``; data
    parallel training passes the mean of that sum over the ranks, so that the averaged
    gradients equal one process's on the whole batch.
    Returns (loss, stats) where stats has the mean teacher/student entropy and the plain
    (unweighted) mean KL, for logging and for comparing KD with DAD on one scale.
    """
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    with torch.no_grad():
        t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
        pt = t.exp()
        h_t = -(pt * t).sum(-1)
        h_s = -(s.detach().exp() * s.detach()).sum(-1)
        w = DAD_WEIGHTS[weight_fn](h_t, h_s, gamma)
    kl = (pt * (t - s)).sum(-1)                                           # [tokens]
    loss = (w * kl).sum() / weight_norm(w.sum()) * (temperature ** 2)
    stats = {"kl": kl.detach().mean().item(), "h_t": h_t.mean().item(), "h_s": h_s.mean().item()}
    return loss, stats


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
