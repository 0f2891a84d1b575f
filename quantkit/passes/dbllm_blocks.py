"""Block-wise reconstruction for the dbllm pass, run before the end-to-end distillation.

Each decoder block in turn has its target linears replaced by ``FDBTrainLinear`` and trained
(latent weights and alpha1/alpha2, identity STE as in passes/fdb_train.py) so that the
block's output matches the full-precision block's output on calibration activations, by
squared error relative to each token's target norm, averaged over tokens (``token_relative_mse``).

Two activation streams are carried from block to block, both [windows, tokens, hidden] fp32:
    fp_x: the full-precision model's input to block i;
    q_x:  the input of block i in the model whose blocks 0..i-1 are already dual-binarized.
Block i is trained on q_x towards fp_block(fp_x), so it also absorbs the error that the
binarized blocks before it left in its input; then q_x <- qblock(q_x), fp_x <- fp_block(fp_x).
The full-precision block is the same module before its linears are swapped, so no teacher
copy is needed for this stage.

Each block receives the keyword arguments (rotary tables, causal mask, ...) the model's own
forward gives *that* block, recorded once from one window (models whose layers differ, such
as Gemma-3's sliding and global attention layers, get each layer's own); windows all have one
length, so one set serves a batch of rows (batch-1 tensors broadcast).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.models.block_inputs import capture, replay_kwargs
from quantkit.passes.dbllm_feedback import feedback_latent
from quantkit.passes.fdb_train import TrainingDiverged, cosine_lr
from quantkit.passes.targets import replace_module
from quantkit.progress import progress_bar


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(full name, ModuleList) of the model's decoder blocks: ``<inner>.layers`` of a Llama-style
    causal LM (Llama, Qwen2, Gemma-3, Mistral, ...). UsageError for other models."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UsageError("dbllm: block_steps > 0 reconstructs each decoder block, which needs a Llama-style "
                         "model (model.model.layers); set block_steps: 0 for this model")
    return "model.layers", layers


@torch.no_grad()
def _layer_kwargs(model: nn.Module, layers: nn.ModuleList, row: torch.Tensor) -> list[dict[str, Any]]:
    """The keyword arguments each layer receives in the model's forward on one window ``row``
    (int64 [1, T]), made safe to replay (no KV cache)."""
    seen: dict[int, dict] = {}
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, args, kwargs, i=i):
            seen[i] = replay_kwargs(kwargs)
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(row, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if len(seen) != len(layers):
        raise RuntimeError("dbllm: the model's forward did not run every decoder layer")
    return [seen[i] for i in range(len(layers))]


def _block_out(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _run(layer: nn.Module, x: torch.Tensor, kwargs: dict, batch: int, autocast: Callable) -> torch.Tensor:
    """``layer`` over every row of x [W, T, H] in batches of ``batch`` rows; fp32 result."""
    outs = []
    for s in range(0, x.shape[0], batch):
        with autocast():
            outs.append(_block_out(layer(x[s:s + batch], **kwargs)).float())
    return torch.cat(outs)


def reconstruct(model: nn.Module, chosen: list[tuple[str, nn.Linear]], make_fdb: Callable[[nn.Linear], nn.Module],
                ids: torch.Tensor, cfg, autocast: Callable, progress: bool = True,
                log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Replace the ``chosen`` linears inside decoder blocks by ``make_fdb(linear)`` block by block,
    training each block's replacements to reproduce the full-precision block (module docstring).

    ids: calibration windows, int64 [W, T]. cfg: the DbllmPassConfig (block_* keys, seed).
    autocast: a zero-argument callable giving the autocast context of cfg.bf16.
    With cfg.feedback, each linear's latent weight starts from the error-fed rounding
    (passes/dbllm_feedback.py) on the second moments of its inputs in the partly binarized model.
    log: where a line per block goes when there is no progress bar (stderr not a terminal).
    Returns one record per block: layer index, linears trained, token_relative_mse before and
    after training (on all windows) and seconds. Linears outside
    the decoder blocks are left to the caller.
    """
    prefix, layers = decoder_layers(model)
    per_layer_kwargs = _layer_kwargs(model, layers, ids[:1])
    fp_x = capture(model, layers[0], ids).x.float()
    q_x = fp_x.clone()
    g = torch.Generator().manual_seed(cfg.seed)
    records = []
    bar = progress_bar(list(enumerate(layers)), desc="dbllm blocks", disable=not progress, unit="block")
    for i, layer in bar:
        t0 = time.perf_counter()
        kw = per_layer_kwargs[i]
        target = _run(layer, fp_x, kw, cfg.block_batch, autocast)
        mine = [(n, lin) for n, lin in chosen if n.startswith(f"{prefix}.{i}.")]
        hessians = _input_hessians(layer, [lin for _, lin in mine], q_x, kw, cfg.block_batch, autocast) \
            if cfg.feedback and mine else None
        for j, (name, linear) in enumerate(mine):
            fdb = make_fdb(linear)
            if hessians is not None:
                fdb.weight.data = feedback_latent(fdb.weight.detach(), fdb.alpha1.detach(), fdb.alpha2.detach(),
                                                  fdb.group, hessians[j])
            replace_module(model, name, fdb)
        rec = {"layer": i, "linears": len(mine)}
        if mine and cfg.block_steps > 0:
            rec.update(_train_block(layer, [model.get_submodule(n) for n, _ in mine], q_x, target, kw, cfg, g,
                                    autocast))
        q_x = _run(layer, q_x, kw, cfg.block_batch, autocast)
        rec["mse_out"] = _rel_mse(q_x, target)
        fp_x = target
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(rel_mse=f"{rec['mse_out']:.4f}", refresh=False)
        elif log is not None:
            log(f"block {i + 1}/{len(layers)}: relative output error {rec.get('mse_before', float('nan')):.4f} -> "
                f"{rec['mse_out']:.4f} ({rec['seconds']:.0f}s)")
    return records


@torch.no_grad()
def _input_hessians(layer: nn.Module, linears: list[nn.Linear], x: torch.Tensor, kwargs: dict, batch: int,
                    autocast: Callable) -> list[torch.Tensor]:
    """sum of x x^T over every token that reaches each of ``linears`` (fp32 [K, K] each) when
    ``layer`` (still full precision) runs on x [W, T, H]."""
    hs = [torch.zeros(lin.in_features, lin.in_features) for lin in linears]

    def hook(module, args, j):
        a = args[0].detach().float().reshape(-1, args[0].shape[-1])
        hs[j].addmm_(a.T, a)

    handles = [lin.register_forward_pre_hook(lambda m, a, j=j: hook(m, a, j)) for j, lin in enumerate(linears)]
    try:
        _run(layer, x, kwargs, batch, autocast)
    finally:
        for h in handles:
            h.remove()
    return hs


def token_relative_mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over tokens of ||x_t - target_t||^2 / ||target_t||^2 (x, target [..., hidden]).

    Not the plain MSE: from the middle layers on, SmolLM2's first position carries a residual
    of norm ~26,000 against ~150 elsewhere (a "massive activation"), so a plain MSE is >99 %
    that one token and training would fit it alone; normalising per token weighs every
    position by its relative error."""
    err = (x - target).pow(2).sum(-1)
    return (err / target.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _rel_mse(x: torch.Tensor, target: torch.Tensor) -> float:
    return token_relative_mse(x, target).item()


def _train_block(layer: nn.Module, fdb: list[nn.Module], q_x: torch.Tensor, target: torch.Tensor, kw: dict, cfg,
                 g: torch.Generator, autocast: Callable) -> dict:
    """AdamW on the block's FDB parameters: cfg.block_steps steps of cfg.block_batch rows,
    loss token_relative_mse(block(q_x rows), target rows); the rest of the block is frozen."""
    weights = [m.weight for m in fdb if m.weight.requires_grad]
    alphas = [p for m in fdb for p in (m.alpha1, m.alpha2)]
    groups = [{"params": alphas, "lr": cfg.block_lr_alpha, "base_lr": cfg.block_lr_alpha}]
    if weights:
        groups.append({"params": weights, "lr": cfg.block_lr, "base_lr": cfg.block_lr})
    trainable = alphas + weights
    frozen = [p for p in layer.parameters() if not any(p is t for t in trainable) and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    before = _rel_mse(_run(layer, q_x, kw, cfg.block_batch, autocast), target)
    n = q_x.shape[0]
    order, pos = torch.randperm(n, generator=g), 0
    warmup = min(cfg.warmup, cfg.block_steps // 4)
    layer.train()
    last = float("nan")
    for step in range(cfg.block_steps):
        if pos + cfg.block_batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + cfg.block_batch]
        pos += cfg.block_batch
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * cosine_lr(step, cfg.block_steps, warmup)
        with autocast():
            out = _block_out(layer(q_x[idx], **kw))
        loss = token_relative_mse(out.float(), target[idx])
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"dbllm: block reconstruction loss is {loss.item()}; try a lower block_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        last = loss.item()
    layer.eval()
    for p in frozen:
        p.requires_grad_(True)
    return {"mse_before": before, "loss_last_step": last}
