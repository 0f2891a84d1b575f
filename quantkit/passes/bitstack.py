"""The ``bitstack`` pass: activation-aware scaling, residual-block decomposition, block order.

Steps (facts from the reference implementation, algorithms.md §2):
1. Calibration (one no-grad pass of the full-precision model over ``calib_samples`` token
   windows, with forward pre-hooks): per decoder layer, the input of q_proj (shared by
   q/k/v), o_proj, gate_proj (shared by gate/up) and down_proj. For each input X
   [samples, tokens, d] the scale is s_j = mean over samples of ||X[sample, :, j]||_2 + 1e-3.
   Every layer sees full-precision inputs (nothing is compressed yet), as in the reference.
   For the ``proxy`` order the same hooks accumulate Gram matrices XᵀX.
2. Scaling folded into the producer (free at run time): q/k/v columns × s and
   input_layernorm.weight / s; gate/up columns × s and post_attention_layernorm.weight / s;
   down_proj columns × s and up_proj rows / s (down's input is act(gate)·up); o_proj
   columns × s and v_proj rows / s only when v_proj and o_proj have the same shape (plain
   multi-head attention; with grouped-query attention a v row feeds several o columns).
3. Decomposition of each scaled weight into ``n_blocks`` residual blocks of rank ``rank``
   (quantkit/formats/bitstack.py). With ``error_feedback`` each block's signs are chosen with
   GPTQ-style error feedback over the layer's calibration Gram (of x / s, what the scaled
   layer reads), damped by ``damp`` · mean diagonal: not in the reference; it halves the
   calibration output error per block on SmolLM2-135M (docs/benchmarks.md, round 3).
   ``sign_sweeps`` then refines those signs by coordinate descent on the same error (round 4).
4. Model-wide block order, stored per module (``BitStackLinear.order``):
   * ``proxy``: greedy by calibration output-error reduction per byte. For a layer
     with (scaled) input Gram H and error E_b = W' − Ŵ'_b after b blocks, block b+1 is worth
     (tr(E_b H E_bᵀ) − tr(E_{b+1} H E_{b+1}ᵀ)) / tr(W' H W'ᵀ) / block_bytes: the drop of the
     layer's relative output error energy per byte. A layer's blocks are taken in index
     order (a heap over each layer's next block). Cost: one Gram per distinct input, and
     a few n×n products per block.
   * ``ppl`` (default, ``ppl_levels`` = 1): the reference's ranking. For each level b = 1 .. n_blocks−1, with every layer at
     b blocks, add one block to one layer, measure perplexity on the validation windows,
     undo; sort each level's blocks by that perplexity (lowest first) and concatenate the
     levels ((n_blocks − 1) · #layers evaluations). ``ppl_levels`` caps the levels ranked this
     way (the remaining levels follow the proxy order, level by level) because on a CPU
     each evaluation is a forward pass (of the layers from the changed one on:
     quantkit/passes/bitstack_ranking.py). Validation windows are disjoint from the
     calibration windows (one draw of disjoint tiles, split in two).
Comparison of the two on SmolLM2-135M: docs/benchmarks.md (BitStack section).

Block by block (streaming compress of a model folder, ``BitStackStream``): steps 1-3 run per
decoder layer on that layer's inputs, carried from the previous layer's full-precision
outputs (quantkit/stream_calibration.py), and the proxy order is computed after the last
layer from the gains kept per layer: the same artifact as ``apply`` on the loaded model.
The ``ppl`` order needs whole-model forwards, so such a recipe is compressed whole.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from quantkit.errors import UsageError
from quantkit.formats import bitstack
from quantkit.nn.bitstack_linear import BitStackLinear
from quantkit.passes.bitstack_ranking import ppl_order as _ppl_order
from quantkit.passes.targets import replace_module, select_linears, validate_patterns
from quantkit.models.text import CALIB_SPLITS as CALIB_TEXTS  # shipped calibration texts
from quantkit.progress import progress_bar, stage

SCALE_EPS = 1e-3  # added to every activation scale (reference: get_act_scale)


@dataclass(frozen=True)
class BitStackPassConfig:
    """Recipe keys of the bitstack pass.

    targets / ignore: module-name patterns of the linears to decompose (default: every
        Linear except the output head; the reference decomposes q/k/v/o/gate/up/down).
    n_blocks: residual blocks stored per layer (16 in the reference); any prefix loads.
    rank: k, the SVD rank per block (16); each block costs m·n/8 + 2k(m+n) bytes (fp16
        factors) or m·n/8 + k(m+n) + 4k (int8).
    svd: "exact" (torch.linalg.svd, as the reference) or "lowrank" (randomized, faster).
    scale: activation-aware scaling folded into the previous op (Llama-style decoder
        layers: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj and the two norms).
    order: "ppl" (the reference's validation-perplexity ranking, for ``ppl_levels`` levels,
        then the proxy; default) or "proxy" (output-error reduction per byte); see the module
        docstring and docs/benchmarks.md for the comparison behind the default.
    calib_samples / calib_seq_len: windows of calibration text for the scales (and Grams).
    val_samples / val_seq_len: validation windows for order "ppl" (disjoint from calibration).
    ppl_levels: levels ranked by perplexity when order is "ppl" (0 = all n_blocks − 1; default 1:
        each level costs one forward pass per decomposed layer).
    error_feedback: choose each block's signs with GPTQ-style error feedback over the
        calibration input Gram, minimising the block's output error instead of its Frobenius
        error (quantkit/formats/bitstack.py); False = the reference's sign(residual).
    damp: diagonal damping of that Gram, as a fraction of its mean diagonal.
    sign_sweeps: with error_feedback, sweeps of coordinate descent over each block's signs after
        the feedback pass (flip a sign when that lowers the block's output error); 0 = none.
    factor_dtype: storage of each block's rank-k factors: "float16" (the reference) or "int8"
        (per-component scale; half the factor bytes, so more blocks per budget).
    default_calib_text: the shipped text to calibrate on when the user gives none
        (``--calib-text`` / ``calib_text=`` always win): "calib" (120 KB, 52 windows of 512
        tokens) or "calib_large" (1 MB, ~460 windows; what recipes/bitstack.yaml uses).
    seed: window draw and randomized-SVD seed.
    """

    targets: tuple[str, ...] = ("re:.*",)
    ignore: tuple[str, ...] = ("lm_head",)
    n_blocks: int = 16
    rank: int = 16
    svd: Literal["exact", "lowrank"] = "exact"
    scale: bool = True
    order: Literal["proxy", "ppl"] = "ppl"
    calib_samples: int = 16
    calib_seq_len: int = 512
    val_samples: int = 1
    val_seq_len: int = 128
    ppl_levels: int = 1
    error_feedback: bool = False
    damp: float = 0.01
    sign_sweeps: int = 0
    factor_dtype: Literal["float16", "int8"] = "float16"
    default_calib_text: Literal["calib", "calib_large"] = "calib"
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("n_blocks", "rank", "calib_samples", "calib_seq_len", "val_samples", "val_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"'{key}' must be >= 1, got {getattr(self, key)}")
        if self.n_blocks > 64:
            raise ValueError(f"'n_blocks' must be <= 64, got {self.n_blocks}")
        if not 0 <= self.sign_sweeps <= 8:
            raise ValueError(f"'sign_sweeps' must be in 0..8, got {self.sign_sweeps}")
        if self.sign_sweeps and not self.error_feedback:
            raise ValueError("'sign_sweeps' refines error-feedback signs: it needs 'error_feedback: true'")
        if self.factor_dtype not in bitstack.FACTOR_DTYPES:
            raise ValueError(f"'factor_dtype' must be one of {', '.join(bitstack.FACTOR_DTYPES)}, "
                             f"got {self.factor_dtype!r}")
        if self.default_calib_text not in CALIB_TEXTS:
            raise ValueError(f"'default_calib_text' must be one of {', '.join(CALIB_TEXTS)}, "
                             f"got {self.default_calib_text!r}")
        if not 0 < self.damp <= 1:
            raise ValueError(f"'damp' must be in (0, 1], got {self.damp}")
        if self.ppl_levels < 0:
            raise ValueError(f"'ppl_levels' must be >= 0, got {self.ppl_levels}")
        validate_patterns(self.targets, "targets")
        validate_patterns(self.ignore, "ignore")


# ---- calibration ------------------------------------------------------------------------------

class _Stats:
    """Per watched module input: Σ over samples of per-channel L2 norms over tokens, and what
    the proxy order needs to weigh output errors: the input rows X themselves while there are
    fewer rows than channels, then the Gram XᵀX (whichever is smaller; a 4096-wide layer
    calibrated on 512 tokens keeps 512 rows instead of a 4096² Gram and a 4096³ product)."""

    def __init__(self, gram: bool):
        self.gram = gram
        self.norm_sum: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.samples = 0

    def hook(self, name: str):
        def fn(module, args, kwargs=None):
            x = (args[0] if args else kwargs["hidden_states"]).detach().float()  # [batch, tokens, d]
            norms = x.norm(dim=1).sum(0)  # Σ_samples ||X[s, :, j]||_2
            self.norm_sum[name] = self.norm_sum.get(name, 0) + norms
            if self.gram:
                self._add_rows(name, x.reshape(-1, x.shape[-1]))
        return fn

    def _add_rows(self, name: str, flat: torch.Tensor) -> None:
        if name in self.xtx:
            self.xtx[name] = self.xtx[name] + flat.T @ flat
            return
        rows = self.rows.setdefault(name, [])
        rows.append(flat)
        if sum(r.shape[0] for r in rows) >= flat.shape[1]:  # the Gram is now the smaller summary
            g = 0
            for r in rows:
                g = g + r.T @ r
            self.xtx[name] = g
            del self.rows[name]

    def energy(self, name: str, inv_scale) -> "callable":
        """E ↦ tr(E H Eᵀ) for H the (scaled) input Gram per sample of watched input ``name``;
        ``inv_scale`` [d] (or None) is 1/s when the layer now reads x / s."""
        if name in self.xtx:
            h = self.hessian(name, inv_scale)
            return lambda e: float(((e @ h) * e).sum())
        x = torch.cat(self.rows[name])
        if inv_scale is not None:
            x = x * inv_scale[None, :]
        return lambda e: float((e @ x.T).square().sum()) / self.samples

    def hessian(self, name: str, inv_scale) -> torch.Tensor:
        """H = XᵀX / samples [d, d] fp32 of watched input ``name`` (as the layer sees it: x / s
        when ``inv_scale`` = 1/s is given)."""
        if name in self.xtx:
            h = self.xtx[name] / self.samples
            return h if inv_scale is None else h * inv_scale[:, None] * inv_scale[None, :]
        x = torch.cat(self.rows[name])
        if inv_scale is not None:
            x = x * inv_scale[None, :]
        return x.T @ x / self.samples

    def clear(self) -> None:
        self.rows.clear()
        self.xtx.clear()


def _llama_layers_check(layers, model_name: str) -> None:
    """Raise unless every layer is a Llama-style decoder layer (what scale folding needs)."""
    ok = all(
        hasattr(l, "self_attn") and hasattr(l, "mlp") and hasattr(l, "input_layernorm")
        and hasattr(l, "post_attention_layernorm")
        and all(isinstance(getattr(l.self_attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        and all(isinstance(getattr(l.mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
        for l in layers)
    if not ok:
        raise UsageError("bitstack scale: true needs Llama-style decoder layers (model.layers[i].self_attn.{q,k,v,o}"
                         "_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm); "
                         f"{model_name} does not have them (set scale: false)")


def _llama_layers(model: nn.Module):
    """The decoder layers of a Llama-style model, or raise."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    _llama_layers_check(layers if layers is not None else [None], type(model).__name__)
    return layers


def _watch_points(model: nn.Module, chosen: dict[str, nn.Linear]) -> dict[str, str]:
    """Linear name -> name of the module whose input it reads (q/k/v share q's, gate/up share gate's)."""
    names = {id(m): n for n, m in model.named_modules()}
    shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    out = {}
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        src = f"{parent}.{shared[leaf]}" if leaf in shared and f"{parent}.{shared[leaf]}" in names.values() else name
        out[name] = src
    return out


@torch.no_grad()
def _calibrate(model: nn.Module, sources: set[str], ids: torch.Tensor, gram: bool, progress: bool) -> _Stats:
    stats = _Stats(gram)
    handles = [model.get_submodule(n).register_forward_pre_hook(stats.hook(n)) for n in sorted(sources)]
    # the hooks only read inputs inside the decoder: run the model without its output head
    # when every watched module lies in the inner model (the head is ~12 % of SmolLM2's forward)
    inner = getattr(model, "model", None)
    run = inner if isinstance(inner, nn.Module) and all(n.startswith("model.") for n in sources) else model
    kwargs = {"use_cache": False} if hasattr(run, "config") else {}  # Hugging Face models: no KV cache
    try:
        for row in progress_bar(list(ids), desc="bitstack calibration", disable=not progress):
            run(row[None], **kwargs)
            stats.samples += 1
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def _fold_layer(model: nn.Module, prefix: str, layer: nn.Module, scales: dict[str, torch.Tensor],
                chosen: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """Scale one decoder layer's weights in place (W' = W·diag(s)) and fold 1/s into the
    producers, which all live in the same layer.

    Returns {linear name: s} for the linears actually scaled (the input they now see is x / s).
    """
    applied = {}
    attn, mlp = layer.self_attn, layer.mlp

    def group(members, producer_div):
        names = [f"{prefix}.{m}" for m in members]
        if not all(n in chosen for n in names) or names[0] not in scales:
            return
        s = scales[names[0]]
        for n in names:
            w = model.get_submodule(n).weight
            w.mul_(s.to(w.dtype)[None, :])
            applied[n] = s
        producer_div(s)

    def div_norm(norm):
        return lambda s: norm.weight.div_(s.to(norm.weight.dtype))

    def div_rows(linear):
        def f(s):
            linear.weight.div_(s.to(linear.weight.dtype)[:, None])
            if linear.bias is not None:
                linear.bias.div_(s.to(linear.bias.dtype))
        return f

    group(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], div_norm(layer.input_layernorm))
    group(["mlp.gate_proj", "mlp.up_proj"], div_norm(layer.post_attention_layernorm))
    # down's input is act(gate)·up: dividing up's output rows divides that input exactly
    group(["mlp.down_proj"], div_rows(mlp.up_proj))
    # o's input is the attention mix of v's outputs; only with as many v rows as o columns
    # (no GQA head sharing) is dividing v's rows the same as dividing o's input
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        group(["self_attn.o_proj"], div_rows(attn.v_proj))
    return applied


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise UsageError("module not found in model")


# ---- block order ----------------------------------------------------------------------------

def _proxy_gains(mod: BitStackLinear, w_scaled: torch.Tensor, energy) -> list[float]:
    """Relative output-error-energy drop of blocks 2..n per byte (index i-1 = block i, i >= 1);
    ``energy``: E ↦ tr(E H Eᵀ) (``_Stats.energy``)."""
    total = max(energy(w_scaled), 1e-30)
    blocks = mod.packed()
    w_hat = torch.zeros_like(w_scaled)
    errs = []
    for i in range(mod.n_blocks):
        w_hat += bitstack.reconstruct(bitstack.BitStackBlocks(blocks.signs[i:i + 1], blocks.u[i:i + 1],
                                                              blocks.v[i:i + 1]))
        errs.append(energy(w_scaled - w_hat))
    bb = mod.block_bytes()
    return [(errs[i - 1] - errs[i]) / total / bb for i in range(1, mod.n_blocks)]


def _proxy_order(gains: dict[str, list[float]], levels_from: int = 1) -> list[tuple[str, int]]:
    """Greedy order of (module, block index >= levels_from): best gain per byte first, each
    module's blocks in index order."""
    heap = [(-g[levels_from - 1], name, levels_from) for name, g in gains.items() if len(g) >= levels_from]
    heapq.heapify(heap)
    out = []
    while heap:
        _, name, i = heapq.heappop(heap)
        out.append((name, i))
        if i < len(gains[name]):
            heapq.heappush(heap, (-gains[name][i], name, i + 1))
    return out


# ---- the pass ---------------------------------------------------------------------------------

def _windows(cfg: BitStackPassConfig, calib) -> torch.Tensor:
    """Calibration windows, then (order "ppl") validation windows: int64 [n, seq]."""
    if calib is None:
        raise UsageError("the bitstack pass needs calibration data (quantkit.compress passes it)")
    need_val = cfg.order == "ppl"
    n = cfg.calib_samples + (cfg.val_samples if need_val else 0)
    seq = max(cfg.calib_seq_len, cfg.val_seq_len if need_val else 0)
    return calib.batches(n, seq, seed=cfg.seed)  # disjoint tiles when the text is long enough


def _decompose(model: nn.Module, cfg: BitStackPassConfig, chosen: dict[str, nn.Linear], watch: dict[str, str],
               stats: _Stats, layers: list[tuple[str, nn.Module]], progress: bool) -> dict[str, list[float]]:
    """Fold the activation scales into ``layers`` (their Llama-style groups), decompose every
    ``chosen`` linear into a BitStackLinear in place; returns each one's proxy gains.

    The same code serves the whole model (all layers at once) and streaming (one layer)."""
    scales = {n: stats.norm_sum[watch[n]] / stats.samples + SCALE_EPS for n in chosen}
    applied = {}
    if cfg.scale:
        for prefix, layer in layers:
            applied.update(_fold_layer(model, prefix, layer, scales, chosen))
    gains = {}
    for name, linear in progress_bar(list(chosen.items()), desc="bitstack decompose", disable=not progress):
        w = linear.weight.data.float()
        inv = 1.0 / applied[name] if name in applied else None  # the layer now reads x / s
        h = stats.hessian(watch[name], inv) if cfg.error_feedback else None
        mod = BitStackLinear.from_weight(w, linear.bias, cfg.n_blocks, cfg.rank, cfg.svd, seed=cfg.seed,
                                         hessian=h, damp=cfg.damp, factor_dtype=cfg.factor_dtype,
                                         sign_sweeps=cfg.sign_sweeps)
        gains[name] = _proxy_gains(mod, w, stats.energy(watch[name], inv))
        replace_module(model, name, mod)
    return gains


def _set_order(mods: dict[str, BitStackLinear], order: list[tuple[str, int]]) -> None:
    positions = {n: [] for n in mods}
    for pos, (name, i) in enumerate(order):
        positions[name].append(pos)
    for name, mod in mods.items():
        mod.order = positions[name]


def apply(model: nn.Module, cfg: BitStackPassConfig, progress: bool = True, scope: str = "",
          calib=None) -> list[str]:
    """Decompose matching linears of ``model`` (in place) into BitStackLinear stacks."""
    if scope:
        raise UsageError("the bitstack pass needs the whole model here; block by block it runs through "
                         "quantkit/streaming.py (BitStackStream)")
    chosen = dict(select_linears(model, cfg.targets, cfg.ignore, scope))
    if not chosen:
        return []
    ids = _windows(cfg, calib)
    watch = _watch_points(model, chosen)
    was_training = model.training
    model.eval()
    with stage(f"bitstack calibration ({cfg.calib_samples} windows x {cfg.calib_seq_len} tokens)", progress):
        stats = _calibrate(model, set(watch.values()), ids[:cfg.calib_samples, :cfg.calib_seq_len],
                           gram=True, progress=progress)
    layers = []
    if cfg.scale:
        layers = [(_name_of(model, layer), layer) for layer in _llama_layers(model)]
    with stage(f"bitstack decomposition ({len(chosen)} linears x {cfg.n_blocks} blocks)", progress):
        gains = _decompose(model, cfg, chosen, watch, stats, layers, progress)
    stats.clear()
    mods = {n: model.get_submodule(n) for n in chosen}
    if cfg.n_blocks > 1:
        if cfg.order == "ppl":
            levels = cfg.n_blocks - 1 if cfg.ppl_levels == 0 else min(cfg.ppl_levels, cfg.n_blocks - 1)
            with stage(f"bitstack perplexity ranking ({levels} levels x {len(mods)} evaluations)", progress):
                order = _ppl_order(model, mods, ids[cfg.calib_samples:, :cfg.val_seq_len], levels, progress)
            if levels < cfg.n_blocks - 1:  # the rest level by level, by the error proxy
                order += [(n, i) for n, i in _proxy_order(gains, levels_from=levels + 1)]
        else:
            order = _proxy_order(gains)
        _set_order(mods, order)
    model.train(was_training)
    return list(chosen)


# ---- block by block (streaming compress) -------------------------------------------------------

class BitStackStream:
    """The bitstack pass one decoder block at a time (quantkit/streaming.py drives it).

    Per block: calibrate on the block's inputs (the full-precision activations, as the
    whole-model pass sees them), fold the scales, decompose, keep the proxy gains; after the
    last block, the proxy order over all layers. Gives the same artifact as ``apply`` with
    ``order: proxy``. The perplexity order needs the whole model, so it is not streamed.
    """

    def __init__(self, cfg: BitStackPassConfig):
        self.cfg = cfg

    @staticmethod
    def refusal(cfg: BitStackPassConfig) -> str | None:
        """Why this config cannot run block by block (None: it can)."""
        if cfg.order == "ppl" and cfg.n_blocks > 1:
            return ("bitstack order 'ppl' ranks blocks by whole-model perplexity (order 'proxy' runs block by "
                    "block)")
        return None

    def windows(self, calib) -> torch.Tensor:
        return _windows(self.cfg, calib)[:self.cfg.calib_samples, :self.cfg.calib_seq_len]

    def block(self, model: nn.Module, block_name: str, inputs) -> tuple[torch.Tensor, dict]:
        """Compress the linears of block ``block_name`` in place; returns (the block's
        full-precision outputs for the next block, a JSON-able record for ``finalize``)."""
        cfg = self.cfg
        chosen = dict(select_linears(model, cfg.targets, cfg.ignore, block_name))
        block = model.get_submodule(block_name)
        stats = _Stats(gram=True)
        watch = _watch_points(model, chosen)
        handles = [model.get_submodule(n).register_forward_pre_hook(stats.hook(n), with_kwargs=True)
                   for n in sorted(set(watch.values()))]
        try:
            with torch.no_grad():
                outs = []
                for i in range(inputs.x.shape[0]):  # one window per call, as the whole-model pass
                    outs.append(inputs.run_row(block, i))
                    stats.samples += 1
        finally:
            for h in handles:
                h.remove()
        if not chosen:
            return torch.stack(outs), {"gains": {}}
        if cfg.scale:
            _llama_layers_check([block], type(model).__name__)
        gains = _decompose(model, cfg, chosen, watch, stats, [(block_name, block)] if cfg.scale else [], False)
        return torch.stack(outs), {"gains": gains}

    def finalize(self, records: list[dict]) -> dict[str, dict]:
        """{module name: spec fields to set} from every block's record: the model-wide order."""
        gains = {n: g for r in records for n, g in r["gains"].items()}
        if self.cfg.n_blocks == 1:
            return {}
        positions = {n: [] for n in gains}
        for pos, (name, _) in enumerate(_proxy_order(gains)):
            positions[name].append(pos)
        return {n: {"order": p} for n, p in positions.items()}
