"""BitStack: a weight as a stack of ~1-bit residual blocks (iterative absolute-value decomposition).

A (scaled) weight W [m, n] (m = out_features, n = in_features) is decomposed in fp32 as

    R_0 = W
    for i in 0 .. n_blocks-1:
        S_i = sign(R_i)  with sign(0) := +1                       ±1 [m, n]
        |R_i| ≈ U_k Σ_k V_kᵀ (rank k SVD)
        u_i = U_k · diag(sqrt(Σ_k))      [m, k]   stored fp16
        v_i = diag(sqrt(Σ_k)) · V_kᵀ     [k, n]   stored fp16
        block_i = S_i ⊙ (u_i v_i)
        R_{i+1} = R_i − block_i          (with the fp32 u_i, v_i, before the fp16 cast)

With a Hessian H [n, n] of the inputs (``quantize(..., hessian=H)``), the signs S_i are not
simply sign(R_i): they are chosen column by column with error feedback (the update rule of
GPTQ / optimal brain quantization), so that block i minimises the *output* error
tr((R_i − block_i) H (R_i − block_i)ᵀ) given its magnitudes u_i v_i, not ‖R_i − block_i‖_F. The
magnitudes still come from the rank-k SVD of |R_i|, and R_{i+1} = R_i − block_i is the true
residual, so the format, the prefix property and the kernels are unchanged. ``sign_sweeps``
then revisits every column by coordinate descent (flip a sign when that lowers the same output
error), which the one-pass greedy choice cannot do for columns it signed before the later ones.

and any prefix of b blocks reconstructs  Ŵ_b = Σ_{i<b} S_i ⊙ (u_i v_i)  (u, v read back as
fp32 from fp16). Error falls with every block, so one artifact can be loaded at any b.

Packed layout (what ``quantize`` returns and the ``quantkit::bitstack_linear`` op takes):
    signs  uint8 [b, m, ceil(n/8)]  bit = 1 for +1, 0 for −1; row by row, each row padded
                                    with zero bits to whole bytes; **MSB first**: column c
                                    of row r is bit (7 − c % 8) of byte signs[i, r, c // 8]
                                    (the reference's bit order, but per row so a kernel
                                    can address a row's bytes directly)
    u      fp16  [b, m, k]      (factor_dtype "float16", the reference's)
    v      fp16  [b, k, n]
  or, with factor_dtype "int8" (ours, format version 2):
    u      int8  [b, m, k]      symmetric, −127..127
    v      int8  [b, k, n]
    scale  fp32  [b, k]         u_i v_i = Σ_j scale[i, j] · u[i, :, j] ⊗ v[i, j, :]
Bytes per block: m·ceil(n/8) + 2·k·(m + n) (fp16 factors), i.e. ≈ 1 + 16·k·(m+n)/(m·n)
bits/weight; m·ceil(n/8) + k·(m + n) + 4·k with int8 factors (≈ 1 + 8·k·(m+n)/(m·n)).

Why int8 factors: on SmolLM2-135M's small matrices the fp16 factors of a rank-4 block are
0.15–0.44 bits/weight of its ≈ 1.18; int8 halves that, so the same memory holds ≈ 8 % more
blocks, and the factors are quantized *before* the signs are chosen, so the error feedback
and the next block absorb their rounding (measured: no perplexity change at equal blocks;
docs/benchmarks.md, round 4). Per rank component j, u's column and v's row each get a
max-abs scale (su_j, sv_j) and ``scale`` stores the product su_j · sv_j. 4-bit factors were
measured too and fail (a few outlier columns of the scaled weight set the max).

Nothing here knows about models; ``quantkit.nn.BitStackLinear`` holds the packed tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import FormatError

FORMAT_NAME = "bitstack"
FORMAT_VERSION = 2          # 2 added int8 factors; fp16-factor artifacts are still written as 1
FACTOR_DTYPES = ("float16", "int8")
SVD_METHODS = ("exact", "lowrank")
# torch.svd_lowrank settings for svd="lowrank": oversampling of the random range finder
# and power iterations (|R| has a dominant first singular value, so 2 iterations suffice;
# see docs/benchmarks.md for the perplexity check against the exact SVD).
_LOWRANK_OVERSAMPLE = 8
_LOWRANK_NITER = 2

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # MSB first


@dataclass(frozen=True)
class BitStackBlocks:
    """Packed blocks of one weight (see the module docstring for shapes and bit order)."""

    signs: torch.Tensor  # uint8 [b, m, ceil(n/8)]
    u: torch.Tensor      # fp16 [b, m, k], or int8 with ``scale``
    v: torch.Tensor      # fp16 [b, k, n], or int8 with ``scale``
    scale: torch.Tensor | None = None  # fp32 [b, k] for int8 factors, else None

    @property
    def factor_dtype(self) -> str:
        return "int8" if self.u.dtype == torch.int8 else "float16"

    @property
    def n_blocks(self) -> int:
        return int(self.signs.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.u.shape[1]), int(self.v.shape[2])

    @property
    def rank(self) -> int:
        return int(self.u.shape[2])

    def prefix(self, b: int) -> "BitStackBlocks":
        """The first ``b`` blocks (views, no copy)."""
        if not 1 <= b <= self.n_blocks:
            raise FormatError(f"need 1 <= b <= {self.n_blocks} blocks, got {b}")
        return BitStackBlocks(self.signs[:b], self.u[:b], self.v[:b],
                              None if self.scale is None else self.scale[:b])

    def factors_fp32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """u [b, m, k], v [b, k, n] in fp32 with u_i v_i the block magnitudes (the int8
        scale folded into u)."""
        if self.scale is None:
            return self.u.float(), self.v.float()
        return self.u.float() * self.scale.float()[:, None, :], self.v.float()


def block_bytes(m: int, n: int, k: int, factor_dtype: str = "float16") -> int:
    """Bytes one residual block of an [m, n] weight at rank k occupies (signs + u, v [+ scale])."""
    if factor_dtype not in FACTOR_DTYPES:
        raise FormatError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {factor_dtype!r}")
    if factor_dtype == "int8":
        return m * ((n + 7) // 8) + k * (m + n) + 4 * k
    return m * ((n + 7) // 8) + 2 * k * (m + n)


def quantize_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 u [m, k], v [k, n] -> int8 u_q [m, k], int8 v_q [k, n], fp32 scale [k] with
    u v ≈ Σ_j scale[j] u_q[:, j] ⊗ v_q[j, :] (per-component symmetric max-abs, −127..127).

    A component that is all zero gets scale 0 (and zero codes)."""
    su = u.abs().amax(dim=0) / 127.0  # [k]
    sv = v.abs().amax(dim=1) / 127.0  # [k]
    uq = torch.where(su > 0, u / torch.where(su > 0, su, 1.0), 0.0).round().clamp(-127, 127).to(torch.int8)
    vq = (torch.where(sv[:, None] > 0, v / torch.where(sv > 0, sv, 1.0)[:, None], 0.0)
          .round().clamp(-127, 127).to(torch.int8))
    return uq, vq, (su * sv).float()


def pack_signs(s: torch.Tensor) -> torch.Tensor:
    """Bool/±1 [..., m, n] (True or >= 0 means +1) -> uint8 [..., m, ceil(n/8)], MSB first."""
    pos = (s >= 0) if s.dtype != torch.bool else s
    n = pos.shape[-1]
    pad = (-n) % 8
    if pad:
        pos = torch.nn.functional.pad(pos, (0, pad), value=False)
    bits = pos.reshape(*pos.shape[:-1], -1, 8).to(torch.uint8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., m, ceil(n/8)] -> fp32 ±1 [..., m, n] (inverse of ``pack_signs``)."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != (n + 7) // 8:
        raise FormatError(f"packed signs must be uint8 [..., {(n + 7) // 8}] for n = {n}, "
                          f"got {packed.dtype} {list(packed.shape)}")
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :n]
    return bits.float() * 2.0 - 1.0


def _rank_k_factors(a: torch.Tensor, k: int, svd: str, generator: torch.Generator | None):
    """u [m, k], v [k, n] fp32 with u v ≈ a (best rank k for svd="exact")."""
    k = min(k, *a.shape)
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(a, full_matrices=False)
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    else:
        q = min(k + _LOWRANK_OVERSAMPLE, *a.shape)
        # svd_lowrank draws from the global RNG: fork it so the result depends only on the seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            U, S, V = torch.svd_lowrank(a, q=q, niter=_LOWRANK_NITER)
        U, S, Vh = U[:, :k], S[:k], V[:, :k].T
    root = S.clamp_min(0).sqrt()
    return U * root, root[:, None] * Vh


def _damped_gram_and_hinv(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H + λI, upper Cholesky factor U of (H + λI)⁻¹ with UᵀU = (H + λI)⁻¹), fp32 [n, n] each,
    λ = damp · mean(diag H).

    Channels that never fired (diag 0) get diag 1 so H stays invertible; if H is still not
    positive definite (rank-deficient calibration), λ grows tenfold up to four times."""
    h = h.detach().float().clone()
    n = h.shape[0]
    d = torch.diagonal(h)
    dead = d <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    d[dead] = 1.0
    lam = damp * float(d.mean())
    eye = torch.eye(n, dtype=h.dtype)
    for _ in range(5):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return h + lam * eye, u
        lam *= 10
    raise FormatError("bitstack: the calibration Hessian is not positive definite even with damping "
                      f"{lam / 10 / float(d.mean()):g} x mean(diag); use more calibration tokens")


def _hinv_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (``_damped_gram_and_hinv``), fp32 [n, n]."""
    return _damped_gram_and_hinv(h, damp)[1]


def _feedback_signs(r: torch.Tensor, mag: torch.Tensor, hinv_u: torch.Tensor, cols: int = 32) -> torch.Tensor:
    """Signs ±1 [m, n] for the block S ⊙ mag of residual ``r`` [m, n] with GPTQ error feedback.

    Column c takes the sign of its feedback-updated value w_c; its error
    (w_c − s_c·mag_c) / U[c, c] is spread over the later columns through row c of ``hinv_u``
    (the upper Cholesky factor of H⁻¹), which is what minimises the output error of the block
    column by column. Columns are processed in groups of ``cols``: inside a group the update is
    per column, between groups one matrix product (the lazy batch update of GPTQ)."""
    m, n = r.shape
    w = r.clone()
    signs = torch.empty_like(r)
    plus, minus = torch.tensor(1.0), torch.tensor(-1.0)
    for c0 in range(0, n, cols):
        c1 = min(c0 + cols, n)
        wg = w[:, c0:c1].clone()
        errs = torch.empty_like(wg)
        ug = hinv_u[c0:c1, c0:c1]
        mg = mag[:, c0:c1]
        for j in range(c1 - c0):
            s = torch.where(wg[:, j] >= 0, plus, minus)
            e = errs[:, j]
            torch.addcmul(wg[:, j], s, mg[:, j], value=-1.0, out=e)
            e.div_(ug[j, j])
            wg[:, j + 1:].addr_(e, ug[j, j + 1:], alpha=-1.0)  # the later columns absorb the error
        # column j is final once signed (later updates only reach columns > j)
        signs[:, c0:c1] = torch.where(wg >= 0, 1.0, -1.0)
        if c1 < n:
            w[:, c1:] -= errs @ hinv_u[c0:c1, c1:]
    return signs


def _refine_signs(r: torch.Tensor, mag: torch.Tensor, signs: torch.Tensor, h: torch.Tensor, sweeps: int,
                  cols: int = 32) -> torch.Tensor:
    """Coordinate descent on the signs ±1 [m, n] of the block S ⊙ mag of residual ``r`` [m, n]:
    ``sweeps`` passes over the columns; in column c every row whose sign flip lowers its output
    error e H eᵀ (e = r − S ⊙ mag, ``h`` [n, n] the damped Gram) flips. Returns new signs.

    With g = e H, flipping s[r, c] changes e[r, c] by δ = 2·s·mag and the error by
    2·δ·g[r, c] + δ²·H[c, c]; a flip is taken only when that is < 0, so the error never grows.
    The greedy feedback pass decides column c before it knows the later columns' signs; a sweep
    revisits every column with all the others known. Columns in groups of ``cols``: g is kept
    exact inside the group and the later columns get the group's flips in one product."""
    s = signs.clone()
    m, n = r.shape
    hd = torch.diagonal(h)
    for _ in range(sweeps):
        g = (r - s * mag) @ h
        for c0 in range(0, n, cols):
            c1 = min(c0 + cols, n)
            gg = g[:, c0:c1].clone()
            moved = torch.zeros(m, c1 - c0)
            hg = h[c0:c1, c0:c1]
            for j in range(c1 - c0):
                c = c0 + j
                delta = 2.0 * s[:, c] * mag[:, c]
                flip = (2.0 * delta * gg[:, j] + delta * delta * hd[c]) < 0
                d = torch.where(flip, delta, 0.0)
                s[:, c] = torch.where(flip, -s[:, c], s[:, c])
                moved[:, j] = d
                gg[:, j + 1:].addr_(d, hg[j, j + 1:])  # e[:, c] moved by d: g += d·H[c]
            if c1 < n:
                g[:, c1:] += moved @ h[c0:c1, c1:]
    return s


def quantize(w: torch.Tensor, n_blocks: int = 16, rank: int = 16, svd: str = "exact",
             seed: int = 0, hessian: torch.Tensor | None = None, damp: float = 0.01,
             factor_dtype: str = "float16", sign_sweeps: int = 0) -> BitStackBlocks:
    """Decompose ``w`` [m, n] (any float dtype, read as fp32) into ``n_blocks`` residual blocks.

    rank: k, the SVD rank per block (clipped to min(m, n); the stored u/v then have that
    many columns). svd: "exact" (torch.linalg.svd, as the reference) or "lowrank"
    (torch.svd_lowrank: randomized, ~7x faster on CPU; deterministic for a given seed).
    hessian: None (signs = sign of the residual, the reference method) or H [n, n], the Gram
    Σ xᵀx of the inputs x [*, n] this weight multiplies (any positive scale): the signs then
    minimise each block's output error with error feedback (module docstring); ``damp`` is
    the diagonal damping added to H as a fraction of its mean diagonal.
    factor_dtype: "float16" (the reference) or "int8" (factors quantized before the signs are
    chosen, so the residual passed on is exactly what the stored factors leave).
    sign_sweeps: with a Hessian, sweeps of coordinate descent over each block's signs after the
    feedback pass (``_refine_signs``); 0 = the feedback pass alone.
    """
    if w.dim() != 2:
        raise FormatError(f"bitstack decomposes 2-D weights, got shape {list(w.shape)}")
    if n_blocks < 1 or rank < 1:
        raise FormatError(f"n_blocks and rank must be >= 1, got {n_blocks} and {rank}")
    if svd not in SVD_METHODS:
        raise FormatError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
    if factor_dtype not in FACTOR_DTYPES:
        raise FormatError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {factor_dtype!r}")
    r = w.detach().float().clone()
    if not torch.isfinite(r).all():
        raise FormatError("bitstack: the weight holds NaN or Inf")
    if sign_sweeps < 0 or (sign_sweeps and hessian is None):
        raise FormatError(f"bitstack: sign_sweeps must be >= 0 and needs a Hessian, got {sign_sweeps}"
                          f"{' without a Hessian' if hessian is None else ''}")
    hinv_u = h_damped = None
    if hessian is not None:
        n = r.shape[1]
        if hessian.shape != (n, n) or not torch.isfinite(hessian).all():
            raise FormatError(f"bitstack: the Hessian must be a finite [{n}, {n}] matrix, got "
                              f"{list(hessian.shape)}")
        if not damp > 0:
            raise FormatError(f"bitstack: damp must be > 0, got {damp}")
        h_damped, hinv_u = _damped_gram_and_hinv(hessian, damp)
    g = torch.Generator().manual_seed(seed)
    signs, us, vs, scales = [], [], [], []
    for _ in range(n_blocks):
        u, v = _rank_k_factors(r.abs(), rank, svd, g)
        if factor_dtype == "int8":
            uq, vq, sc = quantize_factors(u, v)
            scales.append(sc)
            u, v = uq.float() * sc[None, :], vq.float()  # what the stored factors give back
            us.append(uq)
            vs.append(vq)
        else:
            us.append(u.half())
            vs.append(v.half())
        mag = u @ v
        if hinv_u is None:
            s = torch.where(r >= 0, 1.0, -1.0)
        else:
            # torch.ops: the C++ CPU loop when quantkit._C is built, else the references below
            s = torch.ops.quantkit.bitstack_feedback_signs(r, mag, hinv_u)
            if sign_sweeps:
                s = torch.ops.quantkit.bitstack_refine_signs(r, mag, s, h_damped, sign_sweeps)
        signs.append(pack_signs(s))
        # fp16: the fp32 u, v (as the reference); int8: exactly the stored factors
        r -= s * mag
    return BitStackBlocks(torch.stack(signs), torch.stack(us), torch.stack(vs),
                          torch.stack(scales) if scales else None)


def reconstruct(blocks: BitStackBlocks, b: int | None = None) -> torch.Tensor:
    """Reference: Ŵ = Σ_{i<b} S_i ⊙ (u_i v_i) in fp32 [m, n] from the stored factors
    (fp16 read as fp32, or int8 times their scale)."""
    b = blocks.n_blocks if b is None else b
    p = blocks.prefix(b)
    m, n = p.shape
    s = unpack_signs(p.signs, n)  # [b, m, n]
    u, v = p.factors_fp32()
    return (s * torch.bmm(u, v)).sum(0)
