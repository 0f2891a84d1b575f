"""Error-feedback initialisation of the dual-binary planes (the dbllm pass's ``feedback`` key).

With the per-group scales fixed (alpha1, alpha2 from ``init``), each weight is rounded to one
of the four levels {0, a2, a1, a1+a2} of its group. Rounding every weight to its nearest
level minimises the *weight* error; what matters is the layer's *output* error on real
inputs, E[||(W - W_hat) x||^2] = tr((W - W_hat) H (W - W_hat)^T) with H = E[x x^T]. As GPTQ
does for its integer grid, columns are rounded one at a time in input order and each
column's rounding error is pushed onto the columns not yet rounded, in proportion to the
inverse Hessian (Cholesky form), so later columns compensate the earlier ones.

The result is returned as a *latent* weight: each column's value at the moment it was
rounded (the original weight plus the compensation it received). Its nearest-level rounding
is exactly the error-fed choice, so ``FDBTrainLinear`` starts from those bits, and the
latent keeps where between the levels each weight sits for the training that follows.
"""

from __future__ import annotations

import torch

from quantkit.passes.fdb_train import nearest_bits


def hessian_inverse_chol(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, fp64 math, fp32 [K, K].

    Input channels that were never active (zero diagonal) get a unit diagonal, so their
    weights are rounded to nearest and pass no error on."""
    h = h.double().clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    l = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(l)
    return torch.linalg.cholesky(hinv, upper=True).float()


@torch.no_grad()
def feedback_latent(w: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, group: int, h: torch.Tensor,
                    damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Latent weight [N, K] fp32 whose nearest-level rounding is the error-fed rounding.

    w: weight [N, K] fp32. a1, a2: scales [N, G] (G = ceil(K / group)). h: input second
    moments [K, K] (sum or mean of x x^T over calibration tokens; the scale cancels).
    damp: Tikhonov term relative to the mean diagonal. block: columns updated lazily at once
    (same result as one at a time, fewer passes over W).
    """
    n, k = w.shape
    u = hessian_inverse_chol(h, damp)
    work = w.float().clone()
    latent = torch.empty_like(work)
    col_group = torch.arange(k) // group
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = work[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            g = col_group[i1 + i]
            b1, b2 = nearest_bits(col, a1[:, g], a2[:, g])
            q = a1[:, g] * b1 + a2[:, g] * b2
            latent[:, i1 + i] = col
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        work[:, i2:] -= err1 @ u[i1:i2, i2:]
    return latent
