"""tools/reproduce_qat_schedule.py --quick end to end (~10 s) and tools/fit_qat_law.py's fitting pieces."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import fit_qat_law  # noqa: E402
import reproduce_qat_schedule as rq  # noqa: E402

from quantkit.qat.schedule import optimal_qat_fraction  # noqa: E402


def test_reproduce_quick_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce_qat_schedule.py"), "--quick",
                        "--docs", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "qat_quick.csv")))
    fused = [x for x in rows if x["schedule"] == "fused"]
    assert len(fused) == 2 * 4 and sum(x["schedule"] == "classic" for x in rows) == 1
    for x in rows:
        # the packed (converted) model computes what the fake-quant model computed
        assert float(x["val_loss_converted"]) == pytest.approx(float(x["val_loss_q"]), abs=2e-4)
        assert float(x["val_loss_q"]) < math.log(320)  # learned something (uniform = ln vocab)
    assert (tmp_path / "qat_quick.png").stat().st_size > 10_000
    md = (tmp_path / "qat_quick_results.md").read_text()
    assert "Empirical optimum" in md and "Fused vs classic" in md
    assert "plan predicts" in r.stdout


def test_branch_points_share_the_trunk():
    s = rq.Setup(**rq.QUICK)
    runs = rq.plan_runs(s, n_params=100_000)
    for r in runs:
        p = r.plan
        # before its branch point a run's schedule is the trunk's: warmup then the peak LR, no QAT
        assert all(p.lr(t) == pytest.approx(min(1.0, (t + 1) / p.warmup_steps) * p.peak_lr) for t in range(r.branch))
        assert r.branch <= p.qat_start
    f1 = [r for r in runs if r.fraction == 1.0]
    assert f1 and all(r.branch == 0 for r in f1)


def test_batches_are_a_function_of_the_step():
    import torch

    tokens = torch.arange(1000)
    a = rq.batch_for_step(tokens, 7, 4, 16, seed=0)
    assert torch.equal(a, rq.batch_for_step(tokens, 7, 4, 16, seed=0))
    assert not torch.equal(a, rq.batch_for_step(tokens, 8, 4, 16, seed=0))
    assert a.shape == (4, 17) and torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 16, dtype=torch.long))


def test_fit_a_recovers_the_constant():
    pairs = [(s, optimal_qat_fraction(s, 5.0)) for s in (3.0, 10.0, 50.0, 300.0, 5000.0)]
    a, mae = fit_qat_law.fit_a(pairs)
    assert a == pytest.approx(5.0, abs=1e-3) and mae < 1e-4


def test_law_fit_recovers_synthetic_losses():
    import torch

    true = {"E": 2.0, "Bc": 40.0, "beta": 0.3, "theta": 0.5, "kappa": 0.8, "phi": 0.6, "chi": 0.5, "omega": 0.5,
            "lam": 0.05, "mu": 0.3, "xi": 0.2, "rho": 0.3}
    tp = {k: torch.tensor(v, dtype=torch.float64) for k, v in true.items()}
    runs = []
    for d in (1e6, 4e6, 1.6e7):
        for b in (2.0, 4.0):
            for f in (0.05, 0.2, 0.5, 0.8, 1.0):
                t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
                runs.append(dict(N=1e6, D=d, B=b, f=f, L=float(fit_qat_law.predict(tp, t(1e6), t(d), t(b), t(f)))))
    p, _ = fit_qat_law.fit_law(runs, starts=6)
    cols = {k: torch.tensor([r[k] for r in runs], dtype=torch.float64) for k in ("N", "D", "B", "f", "L")}
    pred = fit_qat_law.predict(p, cols["N"], cols["D"], cols["B"], cols["f"])
    assert (pred - cols["L"]).abs().max() < 0.01  # the form can describe its own data
