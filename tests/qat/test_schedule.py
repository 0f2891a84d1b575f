"""quantkit.qat.plan: the optimal-fraction law and the fused / classic LR schedules."""

import math

import pytest

import quantkit.qat as qat
from quantkit.errors import UsageError
from quantkit.qat.schedule import optimal_qat_fraction, tokens_per_param_byte


@pytest.mark.parametrize("s,f", [(10, 0.05), (40, 0.16), (100, 0.23), (200, 0.28), (1e3, 0.38), (1e4, 0.48),
                                 (1e5, 0.56)])
def test_reference_values_of_the_law(s, f):
    # ../shared/reference/algorithms.md §3.2 (values computed there from a = 6.7297)
    assert optimal_qat_fraction(s) == pytest.approx(f, abs=0.005)


def test_law_is_clamped_and_monotone():
    assert optimal_qat_fraction(1.0) == 0.0 and optimal_qat_fraction(0.3) == 0.0
    assert optimal_qat_fraction(1e300) <= 1.0
    vals = [optimal_qat_fraction(10 ** e) for e in range(1, 12)]
    assert vals == sorted(vals)
    assert optimal_qat_fraction(100, a=0.0) == 1.0


def test_tokens_per_parameter_byte_and_paper_example():
    # a 1B model at 4 bits on 100B tokens: S = 200, f ~ 28% (algorithms.md §3.2)
    assert tokens_per_param_byte(1e9, 100e9, 4) == pytest.approx(200)
    p = qat.plan(n_params=1_000_000_000, total_tokens=100_000_000_000, bits=4, tokens_per_step=4_000_000)
    assert p.tokens_per_param_byte == pytest.approx(200)
    assert p.qat_fraction == pytest.approx(math.exp(-6.7297 / math.log(200)))
    assert p.total_steps == 25_000
    assert p.qat_start == 25_000 - round(p.qat_fraction * 25_000)
    assert p.fp_steps + p.qat_steps == p.total_steps


def test_lower_bits_and_more_tokens_raise_the_fraction():
    base = qat.plan(n_params=10**8, total_tokens=10**10, bits=4)
    assert qat.plan(n_params=10**8, total_tokens=10**10, bits=2).qat_fraction > base.qat_fraction
    assert qat.plan(n_params=10**8, total_tokens=10**11, bits=4).qat_fraction > base.qat_fraction
    assert qat.plan(n_params=10**9, total_tokens=10**10, bits=4).qat_fraction < base.qat_fraction


def test_steps_default_to_tokens_and_total_steps_option():
    p = qat.plan(n_params=1000, total_tokens=5000, bits=4)
    assert p.total_steps == 5000 and p.tokens_per_step == 1.0
    p = qat.plan(n_params=1000, total_tokens=5000, bits=4, total_steps=10)
    assert p.total_steps == 10 and p.tokens_per_step == 500
    with pytest.raises(UsageError, match="not both"):
        qat.plan(n_params=1000, total_tokens=5000, bits=4, total_steps=10, tokens_per_step=500)


def test_fused_schedule_decays_inside_qat_without_rewarmup():
    p = qat.plan(n_params=1000, total_tokens=1000, bits=4, total_steps=1000, qat_fraction=0.3, peak_lr=2.0,
                 warmup_steps=10)
    lrs = [p.lr(s) for s in range(p.total_steps)]
    assert p.qat_start == 700
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)  # warmup
    assert all(v == 2.0 for v in lrs[10:700])  # stable, full precision
    decay = lrs[700:]
    assert decay[0] == 2.0 and all(a > b for a, b in zip(decay, decay[1:]))  # decays through QAT, no re-warmup
    assert decay[-1] < 0.01


def test_fused_short_qat_phase_keeps_a_minimum_cooldown():
    p = qat.plan(n_params=1000, total_tokens=1000, bits=4, total_steps=1000, qat_fraction=0.05,
                 warmup_steps=10, cooldown_fraction=0.2)
    assert p.qat_start == 950
    assert p.lr(799) == 1.0 and p.lr(801) < 1.0  # decay starts at 800, partly in full precision


def test_classic_schedule_cools_down_fp_then_rewarms_for_qat():
    p = qat.plan(n_params=1000, total_tokens=1000, bits=4, total_steps=1000, qat_fraction=0.5,
                 warmup_steps=10, qat_warmup_steps=20, schedule="classic", cooldown_fraction=0.2)
    lrs = [p.lr(s) for s in range(1000)]
    assert all(v == 1.0 for v in lrs[10:400])
    assert lrs[499] <= 0.0101  # FP phase ends cooled down (last of 100 linear decay steps)
    assert lrs[500] < lrs[519] == pytest.approx(1.0)  # QAT re-warmup
    assert all(a >= b for a, b in zip(lrs[520:], lrs[521:])) and lrs[-1] < 0.01


@pytest.mark.parametrize("decay", ["linear", "cosine", "sqrt"])
def test_decay_shapes_end_low(decay):
    p = qat.plan(n_params=10, total_tokens=100, bits=4, total_steps=100, qat_fraction=0.5, decay=decay,
                 min_lr=0.1, warmup_steps=1)
    assert p.lr(50) == 1.0 and 0.1 <= p.lr(99) < 0.2


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_params=0, total_tokens=1, bits=4), "positive"),
    (dict(n_params=1, total_tokens=1, bits=4, schedule="wsd"), "schedule"),
    (dict(n_params=1, total_tokens=1, bits=4, decay="exp"), "decay"),
    (dict(n_params=1, total_tokens=1, bits=4, qat_fraction=1.5), "qat_fraction"),
    (dict(n_params=1, total_tokens=1, bits=4, total_steps=0), "total_steps"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        qat.plan(**kwargs)
