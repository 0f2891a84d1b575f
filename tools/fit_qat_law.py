"""Fit the compute-optimal QAT loss law to a CSV of runs, and re-fit the optimal-fraction constant a.

Input: a CSV with one row per run and the columns n_params, budget_tokens, bits, qat_fraction,
val_loss_q (and optionally schedule: only "fused" rows are used), e.g. the CSV that
``tools/reproduce_qat_schedule.py`` writes.

1. The loss law's form (Dremov et al., arXiv 2509.22935; ../shared/reference/algorithms.md §3.3)

       L = E + A/N^α + Bc/D^β                                   (Chinchilla-like FP term)
           + θ·2^(−κB)                                          (QAT precision floor)
           + φ·2^(−χB) / (N^ψ · (1+S_qat)^ω)                    (too few QAT tokens)
           + λ·2^(−μB) · (1+S_fp)^ξ / (N^ν · (1+S_qat)^ρ)       (FP/QAT interaction)

   with S_qat = D_qat/(N·B/8), S_fp = D_fp/(N·B/8), D = D_fp + D_qat. Deviations from the paper's
   form, both needed for runs at f = 0 or f = 1: S is replaced by 1+S (a zero-token phase would
   make a power infinite), and the S_fp exponent ξ may take either sign (the paper's terms
   say long FP training makes quantization harder, which is a positive ξ in this notation).
   When the CSV has a single model size, A, α, ψ and ν cannot be identified; they are dropped
   (A/N^α folds into E, N^ψ and N^ν into φ and λ) and the script says so. The fit minimises a
   Huber loss (δ = 1e-3) between log predicted and log measured losses, with L-BFGS from
   several random starts; positive constants are fitted in log space.

2. The optimal fraction f = exp(−a / ln S_total): ``a`` is re-fitted (least absolute error,
   grid + golden-section search) to the measured per-(budget, bits) optima, and to the optima
   of the fitted law; the MAE on f is printed for the re-fitted a and for the paper's 6.7297.

    python tools/fit_qat_law.py docs/qat_sweep.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantkit.qat.schedule import PAPER_A, optimal_qat_fraction  # noqa: E402

POSITIVE = ["E", "A", "alpha", "Bc", "beta", "theta", "kappa", "phi", "chi", "psi", "omega", "lam", "mu", "nu", "rho"]
FREE = ["xi"]
N_TERMS = ["A", "alpha", "psi", "nu"]


def read_runs(path: Path) -> list[dict]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        if r.get("schedule", "fused") != "fused":
            continue
        out.append(dict(N=float(r["n_params"]), D=float(r["budget_tokens"]), B=float(r["bits"]),
                        f=float(r["qat_fraction"]), L=float(r["val_loss_q"])))
    if not out:
        raise SystemExit(f"{path}: no fused-schedule runs")
    return out


def predict(p: dict, N, D, B, f) -> torch.Tensor:
    """The law (see the module docstring); p maps names to scalar tensors (already positive)."""
    nbytes = N * B / 8.0
    s_qat = 1.0 + f * D / nbytes
    s_fp = 1.0 + (1.0 - f) * D / nbytes
    two = torch.tensor(2.0, dtype=torch.float64)
    n_phi = N ** p["psi"] if "psi" in p else 1.0  # N-dependence: only with several model sizes
    n_lam = N ** p["nu"] if "nu" in p else 1.0
    loss = p["E"] + p["Bc"] / D ** p["beta"] + p["theta"] * two ** (-p["kappa"] * B)
    loss = loss + p["phi"] * two ** (-p["chi"] * B) / (n_phi * s_qat ** p["omega"])
    loss = loss + p["lam"] * two ** (-p["mu"] * B) * s_fp ** p["xi"] / (n_lam * s_qat ** p["rho"])
    if "A" in p:
        loss = loss + p["A"] / N ** p["alpha"]
    return loss


def _params(raw: dict, names: list) -> dict:
    return {k: (raw[k] if k in FREE else torch.exp(raw[k])) for k in names}


def fit_law(runs: list[dict], starts: int = 24, seed: int = 0) -> tuple[dict, float]:
    names = list(POSITIVE + FREE)
    single_n = len({r["N"] for r in runs}) == 1
    if single_n:
        names = [n for n in names if n not in N_TERMS]
    cols = {k: torch.tensor([r[k] for r in runs], dtype=torch.float64) for k in ("N", "D", "B", "f", "L")}
    target = torch.log(cols["L"])
    g = torch.Generator().manual_seed(seed)
    best, best_obj = None, math.inf
    for _ in range(starts):
        raw = {}
        for n in names:
            if n == "E":
                init = math.log(max(min(r["L"] for r in runs) * 0.5, 1e-3))
            elif n in FREE:
                init = float(torch.randn((), generator=g, dtype=torch.float64) * 0.3)
            else:
                init = float(torch.empty((), dtype=torch.float64).uniform_(-3.0, 1.5, generator=g))
            raw[n] = torch.tensor(init, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(list(raw.values()), lr=0.5, max_iter=400, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            pred = predict(_params(raw, names), cols["N"], cols["D"], cols["B"], cols["f"])
            obj = torch.nn.functional.huber_loss(torch.log(pred.clamp(min=1e-9)), target, delta=1e-3, reduction="sum")
            obj.backward()
            return obj

        try:
            opt.step(closure)
            with torch.no_grad():
                pred = predict(_params(raw, names), cols["N"], cols["D"], cols["B"], cols["f"])
                obj = torch.nn.functional.huber_loss(torch.log(pred.clamp(min=1e-9)), target, delta=1e-3,
                                                     reduction="sum").item()
        except RuntimeError:
            continue
        if math.isfinite(obj) and obj < best_obj:
            best_obj, best = obj, {k: v.detach().clone() for k, v in raw.items()}
    if best is None:
        raise SystemExit("the fit diverged from every start")
    return _params(best, names), best_obj


def law_optimum(p: dict, N: float, D: float, B: float) -> float:
    fs = torch.linspace(0, 1, 101, dtype=torch.float64)
    with torch.no_grad():
        losses = predict(p, torch.tensor(N, dtype=torch.float64), torch.tensor(D, dtype=torch.float64),
                         torch.tensor(B, dtype=torch.float64), fs)
    return float(fs[int(torch.argmin(losses))])


def measured_optima(runs: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["N"], r["D"], r["B"]) for r in runs}):
        pts = [r for r in runs if (r["N"], r["D"], r["B"]) == key]
        best = min(pts, key=lambda r: r["L"])
        n, d, b = key
        out.append(dict(N=n, D=d, B=b, S=d / (n * b / 8), f=best["f"], n_points=len(pts)))
    return out


def fit_a(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """a minimising the mean |f̂(S; a) − f| over (S, f) pairs, and that MAE."""
    def mae(a):
        return sum(abs(optimal_qat_fraction(s, a) - f) for s, f in pairs) / len(pairs)

    grid = [i * 0.05 for i in range(0, 601)]  # a in [0, 30]
    a0 = min(grid, key=mae)
    lo, hi = max(0.0, a0 - 0.05), a0 + 0.05
    for _ in range(60):  # golden section on the bracket around the best grid point
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        if mae(m1) <= mae(m2):
            hi = m2
        else:
            lo = m1
    a = (lo + hi) / 2
    return a, mae(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fit the compute-optimal QAT law to a CSV of runs")
    ap.add_argument("csv", type=Path)
    ap.add_argument("--starts", type=int, default=24, help="random starts of the law fit")
    args = ap.parse_args(argv)
    runs = read_runs(args.csv)
    print(f"{len(runs)} fused runs from {args.csv}: model sizes {sorted({int(r['N']) for r in runs})}, "
          f"budgets {sorted({int(r['D']) for r in runs})}, bits {sorted({int(r['B']) for r in runs})}")
    p, obj = fit_law(runs, args.starts)
    if len({r["N"] for r in runs}) == 1:
        print("one model size: A, alpha, psi, nu are not identifiable and were dropped (A/N^alpha folds into E)")
    print("fitted law:")
    for k, v in p.items():
        print(f"  {k:>6} = {float(v):.6g}")
    with torch.no_grad():
        cols = {k: torch.tensor([r[k] for r in runs], dtype=torch.float64) for k in ("N", "D", "B", "f", "L")}
        pred = predict(p, cols["N"], cols["D"], cols["B"], cols["f"])
        err = pred - cols["L"]
    print(f"fit error: Huber objective {obj:.4g}; loss MAE {err.abs().mean():.4f} nats, max |err| "
          f"{err.abs().max():.4f}, RMSE {err.square().mean().sqrt():.4f} (losses {cols['L'].min():.3f}.."
          f"{cols['L'].max():.3f})")
    opt = measured_optima(runs)
    print("optimal QAT fraction per (N, D, B): measured | fitted law | paper's f̂ (a = 6.7297)")
    law_pairs = []
    for o in opt:
        lf = law_optimum(p, o["N"], o["D"], o["B"])
        law_pairs.append((o["S"], lf))
        print(f"  N={int(o['N']):,} D={int(o['D']):,} B={int(o['B'])} S={o['S']:.3g}: {o['f']:.2f} ({o['n_points']} "
              f"fractions run) | {lf:.2f} | {optimal_qat_fraction(o['S']):.3f}")
    # f = exp(-a / ln S) is 0 for every a when S <= 1: such optima say nothing about a
    pairs = [(o["S"], o["f"]) for o in opt if o["S"] > 1.0]
    law_pairs = [(s_, f) for s_, f in law_pairs if s_ > 1.0]
    if len(pairs) < len(opt):
        print(f"{len(opt) - len(pairs)} of {len(opt)} optima have S <= 1, where f̂ = 0 for any a; a is fitted to the rest")
    if not pairs:
        print("no optimum with S > 1: a cannot be re-fitted from these runs")
        return 0
    paper_mae = sum(abs(optimal_qat_fraction(s) - f) for s, f in pairs) / len(pairs)
    a_meas, mae_meas = fit_a(pairs)
    a_law, mae_law = fit_a(law_pairs)
    print(f"re-fitted a from the measured optima: a = {a_meas:.4f} (MAE {mae_meas:.3f} on f); paper's a = {PAPER_A} "
          f"gives MAE {paper_mae:.3f} on the same optima")
    print(f"re-fitted a from the fitted law's optima: a = {a_law:.4f} (MAE {mae_law:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
