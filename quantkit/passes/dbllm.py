"""The ``dbllm`` pass: DB-LLM 2-bit dual binarization + distillation (algorithms.md §1).

1. Every matching ``nn.Linear`` becomes an ``FDBTrainLinear`` (latent weight + learnable
   alpha1/alpha2 per group, initialised from 2-bit RTN: alpha1 = 2s, alpha2 = -s).
2. End-to-end distillation from a frozen full-precision copy of the model (the teacher):
   per-token KL(teacher || student), weighted by ``dad_weight`` (a function of teacher and
   student entropy, see passes/fdb_train.py; ``uniform`` is plain KD) on windows of the
   calibration text, or on sequences sampled from the teacher (``data: sampled``).
3. Every FDBTrainLinear is packed into a ``DualBinLinear`` (2.5 bits/weight at group 64).

A NaN/Inf loss or gradient stops training before the optimizer step that would use it:
the model is packed from the last good parameters and ``TrainingDiverged`` is raised, so
``quantkit compress`` writes nothing (its output folder only appears when complete).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from quantkit.errors import QuantkitError, UsageError
from quantkit.formats import dualbin
from quantkit.nn.dualbin_linear import DualBinLinear
from quantkit.passes import dbllm_blocks
from quantkit.passes.fdb_train import DAD_WEIGHTS, FDBTrainLinear, TrainingDiverged, cosine_lr, distill_loss
from quantkit.passes.targets import replace_module, select_linears, validate_patterns
from quantkit.models.text import CALIB_SPLITS as CALIB_TEXTS  # shipped calibration texts
from quantkit.progress import progress_bar



@dataclass(frozen=True)
class DbllmPassConfig:
    """Recipe keys of the dbllm pass (recipes/dbllm-w2g64.yaml explains each in its header).

    targets / ignore: module-name patterns (passes/targets.py); default every Linear but the head.
    group: weights per (alpha1, alpha2) pair along K: 32 | 64 | 128 | 256.
    init: per-group 2-bit step s: "absmax" (max|w|/2) or "mse" (sign + clip search).
    steps: optimizer steps (0 = FDB init only, no training).
    batch_size, seq_len: sequences per step and tokens per sequence.
    n_samples: distinct training sequences (cycled); tokens seen = steps*batch_size*seq_len.
    lr: AdamW learning rate of the latent weights; lr_alpha: of alpha1/alpha2.
    train_weights: train the latent weights too (else only the scales).
    warmup: linear warm-up steps before the cosine decay (to 10 % of lr).
    loss: "dad" (weighted KL) or "kd" (plain KL, the ablation).
    dad_weight: token weight function for loss=dad: mean_entropy | entropy_gap | uniform.
    dad_gamma: exponent of that weight. temperature: softmax temperature of both models.
    data: "text" (calibration text windows) or "sampled" (sequences sampled from the teacher).
    bf16: run teacher and student under CPU/CUDA bf16 autocast (params stay fp32).
    grad_clip: max global grad norm. seed: data order and sampling.
    log_every: steps between plain loss lines when stderr is not a terminal.
    default_calib_text: shipped text to train on when the user gives none: "calib" (120 KB
        excerpt) | "calib_large" (1 MB); ``--calib-text`` / ``calib=`` always win.
    block_steps: AdamW steps per decoder block of block-wise reconstruction before the
        distillation (passes/dbllm_blocks.py); 0 = none.
    block_samples, block_seq_len: calibration windows (and their length) the blocks are
        reconstructed on; block_batch: windows per step.
    block_lr, block_lr_alpha: learning rates of latent weights / alphas in that stage.
    feedback: choose the initial bits by error feedback over columns on the block's
        calibration inputs (passes/dbllm_feedback.py) instead of nearest-level rounding; runs
        in the block stage (with block_steps: 0 it only initialises).
    """

    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ("lm_head",)
    group: int = 64
    init: Literal["absmax", "mse"] = "mse"
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    n_samples: int = 128
    lr: float = 5e-5
    lr_alpha: float = 5e-4
    train_weights: bool = True
    warmup: int = 10
    loss: Literal["dad", "kd"] = "dad"
    dad_weight: str = "mean_entropy"
    dad_gamma: float = 1.0
    temperature: float = 1.0
    data: Literal["text", "sampled"] = "text"
    bf16: bool = True
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    default_calib_text: Literal["calib", "calib_large"] = "calib"
    block_steps: int = 0
    block_samples: int = 128
    block_seq_len: int = 256
    block_batch: int = 4
    block_lr: float = 1e-4
    block_lr_alpha: float = 1e-3
    feedback: bool = False

    def __post_init__(self) -> None:
        if self.group not in dualbin.VALID_GROUPS:
            raise ValueError(f"'group' must be one of {', '.join(map(str, dualbin.VALID_GROUPS))}, got {self.group}")
        for key in ("batch_size", "seq_len", "n_samples", "log_every", "block_samples", "block_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("seq_len", "block_seq_len"):
            if getattr(self, key) < 2:
                raise ValueError(f"'{key}' must be >= 2, got {getattr(self, key)}")
        if self.block_batch > self.block_samples:
            raise ValueError(f"'block_batch' ({self.block_batch}) must be <= 'block_samples' ({self.block_samples})")
        if self.default_calib_text not in CALIB_TEXTS:
            raise ValueError(f"'default_calib_text' must be one of {', '.join(CALIB_TEXTS)}, "
                             f"got {self.default_calib_text!r}")
        for key in ("steps", "warmup", "block_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"'{key}' must be >= 0, got {getattr(self, key)}")
        for key in ("lr", "lr_alpha", "temperature", "grad_clip", "block_lr", "block_lr_alpha"):
            if not getattr(self, key) > 0:
                raise ValueError(f"'{key}' must be > 0, got {getattr(self, key)}")
        if self.dad_weight not in DAD_WEIGHTS:
            raise ValueError(f"'dad_weight' must be one of {', '.join(DAD_WEIGHTS)}, got {self.dad_weight!r}")
        if self.dad_gamma < 0:
            raise ValueError(f"'dad_gamma' must be >= 0, got {self.dad_gamma}")
        validate_patterns(self.targets, "targets")
        validate_patterns(self.ignore, "ignore")


def _autocast(cfg: DbllmPassConfig, device: torch.device):
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def sample_from_teacher(teacher: nn.Module, prompts: torch.Tensor, seq_len: int, seed: int) -> torch.Tensor:
    """Sequences [n, seq_len] sampled from ``teacher`` (temperature 1) after the first token of
    each prompt row; the method is described as data-free, so this needs no text beyond one
    token per sequence. Uses the model's KV cache (``generate``)."""
    torch.manual_seed(seed)
    start = prompts[:, :1]
    out = teacher.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                           pad_token_id=0)
    return out[:, :seq_len]


def _training_data(teacher: nn.Module, cfg: DbllmPassConfig, calib, device) -> torch.Tensor:
    if calib is None:
        raise QuantkitError("the dbllm pass needs calibration data (quantkit.compress provides it)")
    ids = calib.batches(cfg.n_samples, cfg.seq_len, seed=cfg.seed)
    if cfg.data == "sampled":
        chunks = [sample_from_teacher(teacher, ids[i:i + 16].to(device), cfg.seq_len, cfg.seed + i)
                  for i in range(0, ids.shape[0], 16)]
        ids = torch.cat(chunks).cpu()
    return ids


def _log(msg: str, progress: bool) -> None:
    if progress and os.environ.get("QUANTKIT_QUIET") != "1":
        print(f"quantkit: dbllm: {msg}", file=sys.stderr, flush=True)


def _pack_all(model: nn.Module, names: list[str]) -> None:
    for name in names:
        mod = model.get_submodule(name)
        replace_module(model, name, DualBinLinear.from_packed(mod.pack(), mod.bias))


def train(model: nn.Module, teacher: nn.Module, names: list[str], cfg: DbllmPassConfig, data: torch.Tensor,
          progress: bool = True) -> list[dict]:
    """Distil ``teacher`` into ``model`` (whose ``names`` are FDBTrainLinear) for cfg.steps.

    Returns one dict per step (loss, kl, entropies, seconds). Raises TrainingDiverged on a
    non-finite loss or gradient, leaving the parameters of the last good step.

    Under an initialised process group (``torchrun``, quantkit/distributed.py) each step's
    batch of ``cfg.batch_size`` sequences is split across the ranks (batch_size must be a
    multiple of the world size) and DistributedDataParallel averages the gradients: the same
    optimisation as one process, N times the throughput. Every rank draws the same sequence
    indices, so no data is exchanged.
    """
    from quantkit.distributed import data_parallel, mean_across_ranks

    rank, world = data_parallel()
    if cfg.batch_size % world:
        raise UsageError(f"dbllm: batch_size {cfg.batch_size} must be a multiple of the {world} data-parallel "
                            "ranks (each rank takes an equal slice of every batch)")
    device = next(model.parameters()).device
    fdb = [model.get_submodule(n) for n in names]
    weights = [m.weight for m in fdb if m.weight.requires_grad]
    alphas = [p for m in fdb for p in (m.alpha1, m.alpha2)]
    groups = [{"params": alphas, "lr": cfg.lr_alpha, "base_lr": cfg.lr_alpha}]
    if weights:
        groups.append({"params": weights, "lr": cfg.lr, "base_lr": cfg.lr})
    try:  # fused AdamW: one pass over each parameter instead of several (CPU support: torch >= 2.4)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    trainable = alphas + weights
    for p in model.parameters():
        if not any(p is t for t in trainable):
            p.requires_grad_(False)
    student = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        student = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weight_fn = cfg.dad_weight if cfg.loss == "dad" else "uniform"
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(data.shape[0], generator=g)
    history, pos = [], 0
    model.train()
    bar = progress_bar(range(cfg.steps), desc="dbllm", total=cfg.steps, disable=not progress, unit="step")
    t0 = time.perf_counter()
    for step in bar:
        idx = []
        while len(idx) < cfg.batch_size:
            if pos == len(order):
                order, pos = torch.randperm(data.shape[0], generator=g), 0
            idx.append(order[pos].item())
            pos += 1
        batch = data[idx[rank::world]].to(device)
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * cosine_lr(step, cfg.steps, cfg.warmup)
        with _autocast(cfg, device):
            with torch.no_grad():
                t_logits = teacher(batch).logits
            s_logits = student(batch).logits
        loss, stats = distill_loss(s_logits, t_logits, weight_fn, cfg.dad_gamma, cfg.temperature,
                                   weight_norm=mean_across_ranks)
        global_loss = mean_across_ranks(loss)  # every rank takes the same decision below
        if not torch.isfinite(global_loss):
            raise TrainingDiverged(f"dbllm: loss is {global_loss.item()} at step {step + 1}/{cfg.steps}; stopped before "
                                   "updating (parameters are those of the last good step); try a lower lr/lr_alpha")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        if not torch.isfinite(gnorm):
            raise TrainingDiverged(f"dbllm: gradient norm is {gnorm.item()} at step {step + 1}/{cfg.steps}; stopped "
                                   "before updating (parameters are those of the last good step); try a lower lr")
        opt.step()
        rec = {"step": step + 1, "loss": global_loss.item(), **stats, "seconds": time.perf_counter() - t0}
        history.append(rec)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}", refresh=False)
        elif (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            _log(f"step {step + 1}/{cfg.steps} loss {rec['loss']:.4f} kl {rec['kl']:.4f} "
                 f"H_T {rec['h_t']:.3f} H_S {rec['h_s']:.3f} ({rec['seconds']:.0f}s)", progress)
    model.eval()
    return history


def apply(model: nn.Module, cfg: DbllmPassConfig, progress: bool = True, scope: str = "",
          calib=None, history: Optional[list] = None) -> list[str]:
    """Dual-binarize matching linears of ``model`` in place and distil; returns their names.

    calib: a quantkit.calibration.CalibSource (training text, or prompts for data=sampled).
    history: if a list is given, the per-step training records are appended to it.
    """
    chosen = select_linears(model, cfg.targets, cfg.ignore, scope)
    names = [n for n, _ in chosen]
    if not names:
        return []
    teacher = None
    if cfg.steps > 0:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    def make_fdb(linear: nn.Linear) -> FDBTrainLinear:
        return FDBTrainLinear(linear, cfg.group, cfg.init, cfg.train_weights)

    if cfg.block_steps > 0 or cfg.feedback:
        if calib is None:
            raise QuantkitError("the dbllm pass needs calibration data (quantkit.compress provides it)")
        ids = calib.batches(cfg.block_samples, cfg.block_seq_len, seed=cfg.seed)
        device = next(model.parameters()).device
        _log(f"block-wise reconstruction: {cfg.block_steps} steps x {cfg.block_batch} x {cfg.block_seq_len} tokens "
             f"per block ({ids.shape[0]} windows)", progress)
        t0 = time.perf_counter()
        blocks = dbllm_blocks.reconstruct(model, chosen, make_fdb, ids.to(device), cfg,
                                          lambda: _autocast(cfg, device), progress,
                                          log=lambda msg: _log(msg, progress))
        _log(f"block-wise reconstruction done in {time.perf_counter() - t0:.0f}s; relative output MSE of the "
             f"last block {blocks[-1]['mse_out']:.4f}", progress)
        if history is not None:
            history.extend({"stage": "block", **r} for r in blocks)
    for name, linear in progress_bar(chosen, desc="dbllm init", disable=not progress):
        if not isinstance(model.get_submodule(name), FDBTrainLinear):
            replace_module(model, name, make_fdb(linear))
    if cfg.steps > 0:
        device = next(model.parameters()).device
        data = _training_data(teacher, cfg, calib, device)
        _log(f"{len(names)} layers, {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens "
             f"({cfg.steps * cfg.batch_size * cfg.seq_len:,} tokens, {data.shape[0]} distinct sequences, "
             f"data={cfg.data}, loss={cfg.loss}"
             f"{'/' + cfg.dad_weight if cfg.loss == 'dad' else ''})", progress)
        try:
            records = train(model, teacher, names, cfg, data, progress)
        except TrainingDiverged:
            _pack_all(model, names)  # keep the last good state, packed, for in-place callers
            raise
        finally:
            del teacher
        if history is not None:
            history.extend(records)
    _pack_all(model, names)
    return names
