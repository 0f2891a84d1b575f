"""Quantization-aware training, scheduled by the compute-optimal QAT law.

A training script adds a few lines::

    plan  = quantkit.qat.plan(n_params=N, total_tokens=D, bits=4)   # FP/QAT split + LR schedule
    model = quantkit.qat.prepare(model, recipe, plan=plan)          # fake-quant linears, inactive
    for step in range(plan.total_steps):
        quantkit.qat.step(model, step)                               # QAT on from plan.qat_start
        for g in optimizer.param_groups: g["lr"] = plan.lr(step)
        ...
    model = quantkit.qat.convert(model)                              # packed modules, as PTQ

``plan``: quantkit/qat/schedule.py (the law and the fused / classic LR schedules);
quantizers: quantkit/qat/quantizers.py; recipes: the ``qat`` pass (quantkit/passes/qat.py,
recipes/qat-*.yaml); packed int-k format: quantkit/formats/intk.py. docs/qat.md has the
measurements.
"""

from quantkit.qat.api import convert, param_groups, prepare, qat_modules, step
from quantkit.qat.modules import QATLinear
from quantkit.qat.schedule import PAPER_A, QATPlan, optimal_qat_fraction, plan, tokens_per_param_byte

__all__ = ["plan", "prepare", "step", "convert", "param_groups", "qat_modules", "QATPlan", "QATLinear",
           "optimal_qat_fraction", "tokens_per_param_byte", "PAPER_A"]
