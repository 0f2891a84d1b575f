"""Reproduce the compute-optimal QAT experiment at small scale on this CPU.

Trains Llama-style models from scratch on real English text (the Python documentation corpus in
../shared/data when present, else quantkit's shipped excerpts), at several token budgets and two
weight bit widths, sweeping the QAT fraction f; reports the quantized validation loss of every
point, the empirical optimum per budget, the fraction ``quantkit.qat.plan`` predicts, and the
fused vs classic LR cooldown at equal tokens. Writes a CSV (one row per run, appended as runs
finish), a JSON of the setup, ``docs/qat_sweep.png`` and ``docs/qat_results.md``.

Runs share work exactly: every schedule here holds the peak LR between warmup and its decay,
so all runs of all budgets follow one full-precision "trunk" until they diverge (at the start
of their decay or of QAT, whichever comes first). The trunk is trained once; model and AdamW
state are snapshotted at each divergence point and each run continues from its snapshot with
the same data stream (batch i is a function of step i). A run's result is therefore identical
to training it alone from step 0.

    python tools/reproduce_qat_schedule.py            # the sweep documented in docs/qat.md
    # (docs/qat.md ran it as two processes, --bits 2 and --bits 4, merged with --report-only)
    python tools/reproduce_qat_schedule.py --quick    # CI-sized (< 1 min): tiny model and budgets
    python tools/reproduce_qat_schedule.py --report-only --csv docs/qat_sweep.csv   # re-plot

Every run is evaluated after training with the fake-quantized model (quantizers active) and
again after ``quantkit.qat.convert`` (packed int-k modules); both losses are recorded.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import quantkit.qat as qat  # noqa: E402
from quantkit.models.text import default_text  # noqa: E402

CSV_FIELDS = ["budget_tokens", "steps", "bits", "grid", "schedule", "qat_fraction", "qat_start", "branch_step",
              "n_params", "S", "predicted_fraction", "val_loss_q", "val_loss_converted", "val_loss_fp",
              "run_seconds"]


@dataclass
class Setup:
    hidden: int = 192
    layers: int = 4
    ffn: int = 512
    heads: int = 4
    vocab: int = 1024
    seq: int = 128
    batch: int = 8
    budgets: tuple = (250_000, 500_000, 1_000_000)
    bits: tuple = (2, 4)
    fractions: tuple = (0.0, 0.1, 0.2, 0.35, 0.5, 0.7, 1.0)
    classic_budget: int = 1  # index into budgets
    classic_fractions: tuple = (0.2, 0.5)
    peak_lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    val_windows: int = 64
    seed: int = 0
    bf16: bool = True
    threads: int = 1  # on a shared 2-core machine one thread per process beats two (no OpenMP spin-waits)
    text: str = "corpus"
    notes: dict = field(default_factory=dict)


QUICK = dict(hidden=64, layers=2, ffn=128, heads=2, vocab=320, seq=64, batch=8, budgets=(20_000, 40_000),
             bits=(4,), fractions=(0.0, 0.2, 0.5, 1.0), classic_budget=1, classic_fractions=(0.5,),
             warmup_steps=5, val_windows=16, bf16=False, text="shipped", threads=1)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_text(kind: str) -> tuple[str, str]:
    """(train text, validation text). corpus: ../shared/data/python-docs-en.txt split 95/5 at a
    paragraph boundary; shipped (or corpus missing): quantkit's calib.txt / eval.txt."""
    corpus = ROOT.parent / "shared" / "data" / "python-docs-en.txt"
    if kind == "corpus" and corpus.is_file():
        text = corpus.read_text(encoding="utf-8")
        cut = text.rfind("\n\n", 0, int(len(text) * 0.95))
        return text[:cut], text[cut:]
    return default_text("calib"), default_text("eval")


def build_tokenizer(text: str, vocab: int):
    """Byte-level BPE trained offline on the training text (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok.encode(text).ids, dtype=torch.long)


def batch_for_step(tokens: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Random windows [batch, seq+1]; a pure function of (seed, step), so branches share data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=g)
    return torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])


def val_windows(tokens: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """n evenly spaced, non-overlapping windows [n, seq+1] of the validation tokens."""
    n = min(n, tokens.numel() // (seq + 1))
    return tokens[:n * (seq + 1)].view(n, seq + 1)


# ---------------------------------------------------------------------------------------------
# model, training
# ---------------------------------------------------------------------------------------------
def make_model(s: Setup, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                      max_position_embeddings=max(256, s.seq), tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg)


def loss_of(model, batch: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for i in range(0, windows.shape[0], 16):
        b = windows[i:i + 16]
        total += loss_of(model, b, False).item() * b.shape[0]
    model.train()
    return total / windows.shape[0]


def make_optimizer(model, s: Setup):
    return torch.optim.AdamW(qat.param_groups(model, s.weight_decay), lr=s.peak_lr, betas=(0.9, 0.95))


def snapshot(model, opt) -> dict:
    """Model and AdamW state by parameter name (so a prepared model can resume from it)."""
    names = {p: n for n, p in model.named_parameters()}
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "opt": {names[p]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                    for p, st in opt.state.items()}}


def restore_optimizer(model, opt, saved: dict) -> None:
    for n, p in model.named_parameters():
        if n in saved:
            opt.state[p] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved[n].items()}


def train_steps(model, opt, plan, first: int, last: int, tokens, s: Setup, qat_on: bool) -> None:
    """Optimizer steps first..last-1 with the plan's LR (QAT phase switching when qat_on)."""
    for step in range(first, last):
        if qat_on:
            qat.step(model, step)
        for g in opt.param_groups:
            g["lr"] = plan.lr(step)
        loss = loss_of(model, batch_for_step(tokens, step, s.batch, s.seq, s.seed), s.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def divergence_step(plan) -> int:
    """First step whose LR or QAT phase differs from the shared constant-LR FP trunk."""
    first_decay = next((st for st in range(plan.warmup_steps, plan.total_steps) if plan.lr(st) < plan.peak_lr),
                       plan.total_steps)
    return min(plan.qat_start, first_decay)


def recipe_for(bits: int, start: int) -> dict:
    return {"name": f"sweep-w{bits}", "passes": [{"pass": "qat", "bits": bits, "start": start}]}


@dataclass
class Run:
    budget: int
    bits: tuple  # bit widths evaluated from this run (several only for f = 0: one FP run, RTN per width)
    fraction: float
    schedule: str
    plan: object
    branch: int = 0


def plan_runs(s: Setup, n_params: int) -> list[Run]:
    tps = s.batch * s.seq
    runs = []
    for bi, budget in enumerate(s.budgets):
        steps = max(1, budget // tps)
        mk = lambda bits, f, sched: qat.plan(n_params=n_params, total_tokens=steps * tps, bits=bits,  # noqa: E731
                                             total_steps=steps, qat_fraction=f, peak_lr=s.peak_lr,
                                             warmup_steps=s.warmup_steps, schedule=sched)
        for f in s.fractions:
            if f == 0.0:
                runs.append(Run(budget, tuple(s.bits), f, "fused", mk(s.bits[0], f, "fused")))
            else:
                runs.extend(Run(budget, (b,), f, "fused", mk(b, f, "fused")) for b in s.bits)
        if bi == s.classic_budget:
            for f in s.classic_fractions:
                runs.extend(Run(budget, (b,), f, "classic", mk(b, f, "classic")) for b in s.bits)
    for r in runs:
        r.branch = divergence_step(r.plan)
    # cheapest first, so an interrupted sweep still covers every budget's small fractions
    runs.sort(key=lambda r: (r.plan.total_steps - r.branch, r.budget, r.fraction))
    return runs


def run_sweep(s: Setup, csv_path: Path, log=print) -> list[dict]:
    torch.set_num_threads(s.threads)
    t0 = time.time()
    train_text, val_text = load_text(s.text)
    tok = build_tokenizer(train_text, s.vocab)
    train_tokens, val_tokens = encode(tok, train_text), encode(tok, val_text)
    windows = val_windows(val_tokens, s.val_windows, s.seq)
    model = make_model(s, s.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    s.notes.update(n_params=n_params, n_quantized=n_linear, train_tokens=int(train_tokens.numel()),
                   val_tokens=int(windows.numel()), tokenizer_seconds=round(time.time() - t0, 1))
    log(f"model {n_params:,} params ({n_linear:,} in quantized linears); train text {train_tokens.numel():,} "
        f"tokens, val {windows.numel():,}")
    runs = plan_runs(s, n_params)
    points = sorted({r.branch for r in runs})
    trunk_plan = max((r.plan for r in runs), key=lambda p: p.total_steps)
    opt = make_optimizer(model, s)
    snaps, done = {}, 0
    t1 = time.time()
    for p in points:
        train_steps(model, opt, trunk_plan, done, p, train_tokens, s, qat_on=False)
        done = p
        snaps[p] = snapshot(model, opt)
    s.notes["trunk_steps"] = done
    s.notes["trunk_seconds"] = round(time.time() - t1, 1)
    log(f"trunk: {done} steps in {time.time() - t1:.0f} s; {len(runs)} runs")
    rows = []
    new_file = not csv_path.exists()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        for r in runs:
            t = time.time()
            plan = r.plan
            base = make_model(s, s.seed)
            base.load_state_dict(snaps[r.branch]["model"])
            if r.fraction == 0.0:  # one FP run; every width is a round-to-nearest of its result
                opt = make_optimizer(base, s)
                restore_optimizer(base, opt, snaps[r.branch]["opt"])
                train_steps(base, opt, plan, r.branch, plan.total_steps, train_tokens, s, qat_on=False)
                fp_loss = evaluate(base, windows)
                trained = {b: qat.prepare(copy.deepcopy(base), recipe_for(b, plan.total_steps)) for b in r.bits}
            else:
                fp_loss = float("nan")
                b = r.bits[0]
                model = qat.prepare(base, recipe_for(b, plan.qat_start))
                opt = make_optimizer(model, s)
                restore_optimizer(model, opt, snaps[r.branch]["opt"])
                train_steps(model, opt, plan, r.branch, plan.total_steps, train_tokens, s, qat_on=True)
                trained = {b: model}
            seconds = time.time() - t
            for b, m in trained.items():
                qat.step(m, plan.total_steps)  # quantizers on (f = 0: initialised now, i.e. RTN)
                q_loss = evaluate(m, windows)
                conv_loss = evaluate(qat.convert(m), windows)
                bplan = qat.plan(n_params=n_params, total_tokens=plan.total_tokens, bits=b,
                                 total_steps=plan.total_steps)
                row = dict(budget_tokens=plan.total_tokens, steps=plan.total_steps, bits=b,
                           grid=qat.quantizers.default_grid(b), schedule=r.schedule, qat_fraction=r.fraction,
                           qat_start=plan.qat_start, branch_step=r.branch, n_params=n_params,
                           S=round(bplan.tokens_per_param_byte, 4), predicted_fraction=round(bplan.qat_fraction, 4),
                           val_loss_q=round(q_loss, 5), val_loss_converted=round(conv_loss, 5),
                           val_loss_fp=round(fp_loss, 5), run_seconds=round(seconds, 1))
                writer.writerow(row)
                fh.flush()
                rows.append(row)
                log(f"D={plan.total_tokens:>9,} w{b} f={r.fraction:<4} {r.schedule:<7} loss_q={q_loss:.4f} "
                    f"converted={conv_loss:.4f} fp={fp_loss:.4f} ({seconds:.0f} s)")
    s.notes["total_seconds"] = round(time.time() - t0, 1)
    return rows


# ---------------------------------------------------------------------------------------------
# analysis and report
# ---------------------------------------------------------------------------------------------
def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("budget_tokens", "steps", "bits", "qat_start", "branch_step", "n_params"):
            r[k] = int(r[k])
        for k in ("qat_fraction", "S", "predicted_fraction", "val_loss_q", "val_loss_converted", "val_loss_fp",
                  "run_seconds"):
            r[k] = float(r[k])
    return rows


def optima(rows: list[dict]) -> list[dict]:
    """Per (budget, bits): the fused-schedule fraction with the lowest quantized loss."""
    out = []
    keys = sorted({(r["budget_tokens"], r["bits"]) for r in rows if r["schedule"] == "fused"})
    for budget, bits in keys:
        pts = sorted((r for r in rows if r["schedule"] == "fused" and r["budget_tokens"] == budget
                      and r["bits"] == bits), key=lambda r: r["qat_fraction"])
        best = min(pts, key=lambda r: r["val_loss_q"])
        out.append(dict(budget_tokens=budget, bits=bits, S=pts[0]["S"], n_points=len(pts),
                        fractions=[r["qat_fraction"] for r in pts], best_fraction=best["qat_fraction"],
                        best_loss=best["val_loss_q"], predicted_fraction=pts[0]["predicted_fraction"]))
    return out


def classic_vs_fused(rows: list[dict]) -> list[dict]:
    out = []
    for c in (r for r in rows if r["schedule"] == "classic"):
        f = [r for r in rows if r["schedule"] == "fused" and r["budget_tokens"] == c["budget_tokens"]
             and r["bits"] == c["bits"] and r["qat_fraction"] == c["qat_fraction"]]
        if f:
            out.append(dict(budget_tokens=c["budget_tokens"], bits=c["bits"], qat_fraction=c["qat_fraction"],
                            fused=f[0]["val_loss_q"], classic=c["val_loss_q"],
                            delta=round(c["val_loss_q"] - f[0]["val_loss_q"], 5)))
    return out


def fp_reference(rows: list[dict], budget: int) -> float:
    """The full-precision loss at ``budget``: the f = 0 run before rounding (NaN if not run)."""
    fp = [r["val_loss_fp"] for r in rows if r["budget_tokens"] == budget and r["qat_fraction"] == 0.0
          and r["schedule"] == "fused" and not math.isnan(r["val_loss_fp"])]
    return fp[0] if fp else float("nan")


def plot(rows: list[dict], png: Path) -> None:
    """Quantized loss minus the same budget's FP loss, against the QAT fraction, per bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = sorted({r["bits"] for r in rows})
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5.5 * len(bits_list), 4.2), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        budgets = sorted({r["budget_tokens"] for r in rows if r["bits"] == bits})
        for i, budget in enumerate(budgets):
            color = f"C{i}"
            ref = fp_reference(rows, budget)
            pts = sorted((r for r in rows if r["bits"] == bits and r["budget_tokens"] == budget
                          and r["schedule"] == "fused"), key=lambda r: r["qat_fraction"])
            if not pts or math.isnan(ref):
                continue
            ax.plot([r["qat_fraction"] for r in pts], [r["val_loss_q"] - ref for r in pts], "o-", color=color,
                    label=f"D={budget / 1e6:.3g}M tok, S={pts[0]['S']:.2g} (FP loss {ref:.3f})")
            best = min(pts, key=lambda r: r["val_loss_q"])
            ax.plot([best["qat_fraction"]], [best["val_loss_q"] - ref], "*", color=color, markersize=14)
            ax.axvline(pts[0]["predicted_fraction"], color=color, linestyle=":", linewidth=1)
            cl = [r for r in rows if r["bits"] == bits and r["budget_tokens"] == budget and r["schedule"] == "classic"]
            if cl:
                ax.plot([r["qat_fraction"] for r in cl], [r["val_loss_q"] - ref for r in cl], "x", color=color,
                        markersize=10, mew=2, label=f"classic cooldown, D={budget / 1e6:.3g}M")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"{bits}-bit weights ({qat.quantizers.default_grid(bits)})")
        ax.set_xlabel("QAT fraction of training tokens")
        ax.set_ylabel("quantized val loss − FP val loss (same D), nats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("QAT fraction sweep, 2.0M-param Llama (★ empirical optimum; dotted: plan's prediction)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_markdown(rows: list[dict], setup: dict, md: Path, png_name: str) -> None:
    lines = ["# QAT fraction sweep: measured results", "",
             "Generated by `tools/reproduce_qat_schedule.py` (see docs/qat.md for the discussion).", "",
             f"![sweep]({png_name})", "", "## Setup", "", "```", json.dumps(setup, indent=1), "```", "",
             "## Every run", "",
             "| D tokens | steps | bits | schedule | QAT fraction | QAT start | S | plan f | loss (fake-quant) "
             "| loss (converted) | FP loss (f=0 run) | run s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["bits"], r["budget_tokens"], r["schedule"], r["qat_fraction"])):
        fp = "" if math.isnan(r["val_loss_fp"]) else f"{r['val_loss_fp']:.4f}"
        lines.append(f"| {r['budget_tokens']:,} | {r['steps']} | {r['bits']} | {r['schedule']} | {r['qat_fraction']} "
                     f"| {r['qat_start']} | {r['S']:.3g} | {r['predicted_fraction']:.3f} | {r['val_loss_q']:.4f} "
                     f"| {r['val_loss_converted']:.4f} | {fp} | {r['run_seconds']:.0f} |")
    lines += ["", "## Empirical optimum per budget (fused schedule)", "",
              "| D tokens | bits | S | fractions run | best fraction | best loss | plan's fraction |",
              "|---|---|---|---|---|---|---|"]
    for o in optima(rows):
        lines.append(f"| {o['budget_tokens']:,} | {o['bits']} | {o['S']:.3g} | {', '.join(map(str, o['fractions']))} "
                     f"| {o['best_fraction']} | {o['best_loss']:.4f} | {o['predicted_fraction']:.3f} |")
    cv = classic_vs_fused(rows)
    if cv:
        lines += ["", "## Fused vs classic cooldown at equal tokens", "",
                  "| D tokens | bits | QAT fraction | fused loss | classic loss | classic − fused |", "|---|---|---|---|---|---|"]
        for c in cv:
            lines.append(f"| {c['budget_tokens']:,} | {c['bits']} | {c['qat_fraction']} | {c['fused']:.4f} "
                         f"| {c['classic']:.4f} | {c['delta']:+.4f} |")
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (tiny model, two tiny budgets)")
    ap.add_argument("--csv", type=Path, default=None, help="results CSV (appended to)")
    ap.add_argument("--docs", type=Path, default=None, help="folder for the plot and results page")
    ap.add_argument("--report-only", action="store_true", help="only re-plot / re-tabulate an existing CSV")
    ap.add_argument("--budgets", type=str, default=None, help="comma-separated token budgets")
    ap.add_argument("--bits", type=str, default=None, help="comma-separated bit widths")
    ap.add_argument("--fractions", type=str, default=None, help="comma-separated QAT fractions")
    ap.add_argument("--no-classic", action="store_true", help="skip the classic-cooldown comparison runs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    s = Setup(**QUICK) if args.quick else Setup()
    if args.budgets:
        s.budgets = tuple(int(float(x)) for x in args.budgets.split(","))
    if args.bits:
        s.bits = tuple(int(x) for x in args.bits.split(","))
    if args.fractions:
        s.fractions = tuple(float(x) for x in args.fractions.split(","))
    if args.no_classic:
        s.classic_fractions = ()
    if args.threads:
        s.threads = args.threads
    tag = "quick" if args.quick else "sweep"
    docs = args.docs or (Path("/tmp/qat_quick") if args.quick else ROOT / "docs")
    csv_path = args.csv or docs / f"qat_{tag}.csv"
    docs.mkdir(parents=True, exist_ok=True)
    setup_path = csv_path.with_suffix(".json")
    if not args.report_only:
        if csv_path.exists():
            csv_path.unlink()
        run_sweep(s, csv_path)
        setup_path.write_text(json.dumps(asdict(s), indent=1), encoding="utf-8")
    rows = read_rows(csv_path)
    setup = json.loads(setup_path.read_text()) if setup_path.exists() else {}
    png = docs / f"qat_{tag}.png"
    plot(rows, png)
    write_markdown(rows, setup, docs / f"qat_{tag}_results.md", png.name)
    for o in optima(rows):
        print(f"D={o['budget_tokens']:,} w{o['bits']} S={o['S']:.3g}: best f={o['best_fraction']} "
              f"(loss {o['best_loss']:.4f}); plan predicts f={o['predicted_fraction']:.3f}")
    for c in classic_vs_fused(rows):
        print(f"D={c['budget_tokens']:,} w{c['bits']} f={c['qat_fraction']}: fused {c['fused']:.4f} "
              f"classic {c['classic']:.4f} (classic - fused {c['delta']:+.4f})")
    print(f"wrote {csv_path}, {png}, {docs / f'qat_{tag}_results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
