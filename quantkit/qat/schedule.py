"""The compute-optimal split of a training run into full-precision and QAT phases, and its LR.

Dremov, Grangier, Katharopoulos, Hannun, "Compute-Optimal Quantization-Aware Training",
arXiv 2509.22935 (ICLR 2026). With N parameters, D training tokens and B-bit weights, the
tokens per parameter byte are S = D / (N · B/8), and the loss-optimal QAT fraction is
predicted by

    f = exp(-a / ln S),   a = 6.7297,   clamped to [0, 1]   (0 for S <= 1)

a is a constant the authors fitted to their runs (reported fit error: MAE 0.091 on the
fraction). The value 6.7297 and the MAE come from secondary notes on the paper, not from
the PDF itself: UNVERIFIED (../shared/reference/algorithms.md §3.2). Values: S=10 -> 0.05,
S=100 -> 0.23, S=1e3 -> 0.38, S=1e4 -> 0.48. ``tools/fit_qat_law.py`` re-fits a from
measured optima.

Learning-rate schedules (``QATPlan.lr``), over steps 0 .. total_steps-1:

fused (default; the paper's "cooldown & QAT fusion"): linear warmup to ``peak_lr``, constant
    (full precision) until ``qat_start``, then QAT with the LR decaying to ``min_lr`` over the
    whole QAT phase, no re-warmup. If the QAT phase is shorter than ``cooldown_fraction`` of
    the run, the decay starts that much before the end instead (part of it in full
    precision): a decay of a few steps would be too abrupt. (The paper's decay shape is
    UNVERIFIED; ``decay`` picks linear, cosine or 1-sqrt.)
classic: the full-precision phase is a complete warmup-stable-decay run of its own (decay
    over its last ``cooldown_fraction``), then QAT re-warms up for ``qat_warmup_steps`` and
    decays to ``min_lr`` over the rest of the QAT phase. Same total tokens.

Steps: give ``tokens_per_step`` (e.g. batch · sequence length · data-parallel ranks) or
``total_steps``; without either, a step is one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from quantkit.errors import UsageError

PAPER_A = 6.7297  # fitted constant of the optimal-fraction law (UNVERIFIED, see above)
SCHEDULES = ("fused", "classic")
DECAYS = ("linear", "cosine", "sqrt")


def tokens_per_param_byte(n_params: float, total_tokens: float, bits: float) -> float:
    """S = D / (N · B/8): training tokens per byte of quantized weights."""
    return total_tokens / (n_params * bits / 8.0)


def optimal_qat_fraction(s: float, a: float = PAPER_A) -> float:
    """f = exp(-a / ln S) clamped to [0, 1]; 0 where S <= 1 (the law's form needs ln S > 0)."""
    if s <= 1.0:
        return 0.0
    return min(1.0, max(0.0, math.exp(-a / math.log(s))))


def _decay(p: float, shape: str) -> float:
    """Multiplier in [0, 1] at fraction p in [0, 1) of a decay segment (1 at p=0)."""
    p = min(max(p, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - math.sqrt(p)


@dataclass(frozen=True)
class QATPlan:
    """A run's FP/QAT split and LR schedule. Steps are 0-based; QAT covers
    [qat_start, total_steps). Build it with ``quantkit.qat.plan``."""

    n_params: int
    total_tokens: int
    bits: float
    total_steps: int
    tokens_per_step: float
    tokens_per_param_byte: float
    qat_fraction: float
    qat_start: int
    schedule: str = "fused"
    peak_lr: float = 1.0
    min_lr: float = 0.0
    warmup_steps: int = 0
    qat_warmup_steps: int = 0
    cooldown_fraction: float = 0.2
    decay: str = "linear"

    @property
    def fp_steps(self) -> int:
        return self.qat_start

    @property
    def qat_steps(self) -> int:
        return self.total_steps - self.qat_start

    def is_qat(self, step: int) -> bool:
        return step >= self.qat_start

    def lr(self, step: int) -> float:
        """Learning rate at 0-based ``step`` (``peak_lr`` = 1.0 makes it a multiplier)."""
        t, w = self.total_steps, self.warmup_steps
        hi, lo = self.peak_lr, self.min_lr
        if step < w:
            return hi * (step + 1) / w
        if self.schedule == "fused":
            cooldown = max(1, int(round(self.cooldown_fraction * t)))
            start = min(self.qat_start, t - cooldown)
            if step < start:
                return hi
            return lo + (hi - lo) * _decay((step - start) / max(t - start, 1), self.decay)
        # classic
        if step < self.qat_start:
            fp = self.qat_start
            cooldown = max(1, int(round(self.cooldown_fraction * fp)))
            start = max(w, fp - cooldown)
            if step < start:
                return hi
            return lo + (hi - lo) * _decay((step - start) / max(fp - start, 1), self.decay)
        k = step - self.qat_start
        rw = min(self.qat_warmup_steps, max(self.qat_steps - 1, 0))
        if k < rw:
            return hi * (k + 1) / rw
        return lo + (hi - lo) * _decay((k - rw) / max(self.qat_steps - rw, 1), self.decay)

    def summary(self) -> str:
        return (f"N={self.n_params:,} D={self.total_tokens:,} B={self.bits:g}: S={self.tokens_per_param_byte:.3g}, "
                f"QAT fraction {self.qat_fraction:.3f} -> QAT from step {self.qat_start} of {self.total_steps} "
                f"({self.schedule} schedule)")


def plan(n_params: int, total_tokens: int, bits: float, *, tokens_per_step: Optional[float] = None,
         total_steps: Optional[int] = None, qat_fraction: Optional[float] = None, a: float = PAPER_A,
         schedule: str = "fused", peak_lr: float = 1.0, min_lr: float = 0.0,
         warmup_steps: Optional[int] = None, qat_warmup_steps: Optional[int] = None,
         cooldown_fraction: float = 0.2, decay: str = "linear") -> QATPlan:
    """Split a run of ``total_tokens`` tokens on an ``n_params`` model into FP and ``bits``-bit
    QAT phases with the compute-optimal fraction, and schedule its learning rate.

    tokens_per_step / total_steps: how tokens map to optimizer steps (at most one; neither:
    a step is a token). qat_fraction: override the law's prediction (sweeps, ablations).
    warmup_steps: default 2% of the steps (at least 1); qat_warmup_steps (classic only):
    default the same. Returns a frozen ``QATPlan``.
    """
    if n_params <= 0 or total_tokens <= 0 or bits <= 0:
        raise UsageError(f"plan needs positive n_params, total_tokens and bits; got {n_params}, {total_tokens}, {bits}")
    if schedule not in SCHEDULES:
        raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if decay not in DECAYS:
        raise UsageError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    if tokens_per_step is not None and total_steps is not None:
        raise UsageError("give tokens_per_step or total_steps, not both")
    if not 0.0 < cooldown_fraction <= 1.0:
        raise UsageError(f"cooldown_fraction must be in (0, 1], got {cooldown_fraction}")
    if total_steps is not None:
        if total_steps < 1:
            raise UsageError(f"total_steps must be >= 1, got {total_steps}")
        tps = total_tokens / total_steps
    else:
        tps = 1.0 if tokens_per_step is None else float(tokens_per_step)
        if tps <= 0:
            raise UsageError(f"tokens_per_step must be positive, got {tokens_per_step}")
        total_steps = max(1, math.ceil(total_tokens / tps))
    s = tokens_per_param_byte(n_params, total_tokens, bits)
    if qat_fraction is None:
        f = optimal_qat_fraction(s, a)
    elif 0.0 <= qat_fraction <= 1.0:
        f = float(qat_fraction)
    else:
        raise UsageError(f"qat_fraction must be in [0, 1], got {qat_fraction}")
    qat_start = total_steps - int(round(f * total_steps))
    if warmup_steps is None:
        warmup_steps = max(1, int(round(0.02 * total_steps)))
    if qat_warmup_steps is None:
        qat_warmup_steps = warmup_steps
    if warmup_steps < 0 or qat_warmup_steps < 0:
        raise UsageError("warmup steps must be >= 0")
    global _LAST_PLAN
    _LAST_PLAN = QATPlan(int(n_params), int(total_tokens), float(bits), int(total_steps), tps, s, f, qat_start,
                         schedule, float(peak_lr), float(min_lr), int(warmup_steps), int(qat_warmup_steps),
                         float(cooldown_fraction), decay)
    return _LAST_PLAN


_LAST_PLAN: Optional[QATPlan] = None


def last_plan() -> Optional[QATPlan]:
    """The plan most recently returned by ``plan()`` in this process (None before the first).

    ``prepare(model, recipe)`` without ``plan=`` falls back to it, so the issue's three-line
    recipe (plan, prepare, step) works as written; pass ``plan=`` to be explicit.
    """
    return _LAST_PLAN
