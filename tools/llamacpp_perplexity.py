"""Perplexity of a GGUF model under quantkit and under llama.cpp, on the same token windows.

A measurement tool for the BOS convention (issue #19); no test uses it. The two sides need
different Pythons: quantkit's venv (torch, transformers) and a separate venv holding
llama-cpp-python and numpy (no torch). One script, run under either, with subcommands:

    windows GGUF --out W.json          (quantkit venv) tokenize quantkit's eval text with the
        tokenizer transformers builds from the GGUF (only the tokenizer is loaded), cut it
        with quantkit.models.tokens.cut_windows exactly as perplexity() does, for two
        conventions: "no_bos" (windows of text) and "bos" (each window = [BOS] + 511 text
        tokens; BOS = the tokenizer's default BOS, or its bos_token_id forced when it adds
        none by default, e.g. SmolLM2). Writes the windows, the text and the ids to W.json.
    score-llamacpp W.json --out L.json (llama-cpp-python venv) score those exact windows with
        llama.cpp: each window is evaluated from an empty KV cache with logits for every
        position (logits_all), log-softmax in float64, NLL of the next token; the predicted
        tokens are the same ones quantkit scores (all but window position 0). Also reports
        how llama.cpp itself tokenizes the text and which BOS id it uses, for comparison.
    score-quantkit W.json --out Q.json (quantkit venv) quantkit.load_model(GGUF) (dequantized
        to fp32) + quantkit.eval.perplexity.perplexity() for both conventions (bos=None /
        bos=<id>), after checking perplexity() cuts the windows saved in W.json; with
        --per-window also the NLL of each window and token (an extra forward per window).
    Options: --only bos|no_bos (score one convention), score-llamacpp --kv-f32 (f32 KV cache;
    llama.cpp's default is f16). Results, per-window and per-token NLLs go to the --out JSONs.
    compare GGUF --llama-python PY     (quantkit venv) runs the three above (score-llamacpp
        under PY) and prints quantkit ppl, llama.cpp ppl and their ratio per convention.

Reproduce (see docs/benchmarks.md, "Perplexity against llama.cpp (BOS convention)"):

    python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install numpy llama-cpp-python==0.3.36
    .venv/bin/python tools/llamacpp_perplexity.py compare /tmp/gemma/gemma-3-270m-q4_k_m.gguf \\
        --llama-python /tmp/llvenv/bin/python --per-window
    .venv/bin/python tools/llamacpp_perplexity.py compare smollm2-135m \\
        --llama-python /tmp/llvenv/bin/python --per-window

Note: llama.cpp's own ``llama-perplexity`` tool scores only the second half of each window
(the first half is context); here every position is scored, as quantkit does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

CONVENTIONS = ("bos", "no_bos")


# ----------------------------------------------------------------------------- quantkit side

def _resolve(spec: str):
    from quantkit.models.loading import resolve_model_source

    source = resolve_model_source(spec)
    if source.kind != "gguf":
        raise SystemExit(f"{spec} is a {source.kind}, not a GGUF model")
    return source


def cmd_windows(args) -> None:
    import torch

    from quantkit.eval.perplexity import tokenize
    from quantkit.models.loading import load_source_tokenizer
    from quantkit.models.text import default_text
    from quantkit.models.tokens import cut_windows, default_bos, text_tokens_per_window

    source = _resolve(args.gguf)
    tokenizer = load_source_tokenizer(source)
    text = default_text("eval")
    ids = tokenize(tokenizer, text)  # what perplexity() tokenizes: no special tokens
    default = default_bos(tokenizer)
    bos_id = default if default is not None else tokenizer.bos_token_id
    sets = {}
    for conv, bos in (("bos", bos_id), ("no_bos", None)):
        if conv == "bos" and bos is None:
            continue
        per_window = text_tokens_per_window(args.seq_len, bos)
        available = ids.numel() if args.max_tokens is None else min(ids.numel(), args.max_tokens)
        windows = cut_windows(ids, args.seq_len, bos, max_windows=available // per_window)
        sets[conv] = {"bos": None if bos is None else int(bos), "windows": windows.tolist()}
    out = {
        "gguf": str(source.path / source.gguf_file), "spec": args.gguf,
        "seq_len": args.seq_len, "max_tokens": args.max_tokens,
        "tokenizer": type(tokenizer).__name__, "tokenizer_bos_token": tokenizer.bos_token,
        "tokenizer_bos_id": tokenizer.bos_token_id, "default_bos": default,
        "text": text, "text_ids": ids.tolist(), "sets": sets,
    }
    Path(args.out).write_text(json.dumps(out))
    for conv, s in sets.items():
        w = torch.tensor(s["windows"])
        print(f"{conv}: bos={s['bos']} windows={tuple(w.shape)} predicted={w.shape[0] * (w.shape[1] - 1)}")
    print(f"tokenizer {type(tokenizer).__name__}: bos_token {tokenizer.bos_token!r} id {tokenizer.bos_token_id}, "
          f"added by default: {default is not None}; text {len(text)} chars -> {ids.numel()} ids; wrote {args.out}")


def cmd_score_quantkit(args) -> None:
    import torch

    from quantkit import load_model
    from quantkit.eval.perplexity import perplexity, tokenize
    from quantkit.models.text import default_text
    from quantkit.models.tokens import cut_windows, text_tokens_per_window

    data = json.loads(Path(args.windows).read_text())
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(data["gguf"])
    tokenizer = model._quantkit_tokenizer
    load_s = time.perf_counter() - t0
    text = default_text("eval")
    ids = tokenize(tokenizer, text)
    if ids.tolist() != data["text_ids"]:
        raise SystemExit("the tokenizer load_model attaches tokenizes the text differently from W.json")
    results = {"load_s": load_s, "sets": {}}
    for conv, s in data["sets"].items():
        if args.only and conv != args.only:
            continue
        bos = s["bos"]
        saved = torch.tensor(s["windows"])
        # the windows perplexity() cuts (same arithmetic as in perplexity()) must be the saved ones
        per_window = text_tokens_per_window(data["seq_len"], bos)
        available = min(ids.numel(), data["max_tokens"]) if data["max_tokens"] is not None else ids.numel()
        if not torch.equal(cut_windows(ids, data["seq_len"], bos, max_windows=available // per_window), saved):
            raise SystemExit(f"{conv}: perplexity() would cut other windows than W.json holds")
        r = perplexity(model, tokenizer, text, seq_len=data["seq_len"], max_tokens=data["max_tokens"],
                       progress=False, bos=bos)
        if r.n_windows != saved.shape[0]:
            raise SystemExit(f"{conv}: perplexity() scored {r.n_windows} windows, W.json holds {saved.shape[0]}")
        entry = {"ppl": r.ppl, "nll_mean": r.nll_mean, "n_tokens": r.n_tokens, "n_windows": r.n_windows,
                 "seconds": r.seconds, "bos": r.bos}
        if args.per_window:
            nlls, token_nll = [], []
            with torch.inference_mode():
                for w in saved:
                    logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].double()
                    nll = torch.log_softmax(logits, dim=-1).gather(1, w[1:, None]).neg()[:, 0]
                    nlls.append(float(nll.mean()))
                    token_nll.append(nll.tolist())
            entry["window_nll"], entry["token_nll"] = nlls, token_nll
        results["sets"][conv] = entry
        print(f"quantkit {conv}: ppl {r.ppl:.4f} (nll {r.nll_mean:.5f}, {r.n_tokens} tokens, "
              f"{r.n_windows} windows, {r.seconds:.1f} s)")
    Path(args.out).write_text(json.dumps(results))


# ----------------------------------------------------------------------------- llama.cpp side

def _log_softmax_nll(logits, targets):
    """NLL (float64) of ``targets[i]`` under ``logits[i]`` (numpy float32 [n, vocab])."""
    import numpy as np

    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
    return lse - x[np.arange(len(targets)), targets]


def cmd_score_llamacpp(args) -> None:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    data = json.loads(Path(args.windows).read_text())
    seq_len = data["seq_len"]
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if args.kv_f32 else {}
    llm = Llama(model_path=data["gguf"], n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len, logits_all=True,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=args.verbose, seed=0, **kv)
    info = {"llama_cpp_python": llama_cpp.__version__, "kv_cache": "f32" if args.kv_f32 else "f16 (default)", "n_vocab": llm.n_vocab(), "bos_id": llm.token_bos(),
            "add_bos": bool(llm._model.add_bos_token()) if hasattr(llm._model, "add_bos_token") else None,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}
    # how llama.cpp itself tokenizes the text, compared with the ids quantkit scored
    own = llm.tokenize(data["text"].encode("utf-8"), add_bos=False, special=False)
    ref = data["text_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(own, ref)) if a != b), None)
    if first_diff is None and len(own) != len(ref):
        first_diff = min(len(own), len(ref))
    info["tokenization"] = {"llama_cpp_ids": len(own), "quantkit_ids": len(ref), "first_diff": first_diff,
                            "same_first_8192": own[:8192] == ref[:8192]}
    with_bos = llm.tokenize(b"Hello", add_bos=True, special=False)
    info["llama_cpp_tokenize_hello_add_bos"] = with_bos
    print(f"llama-cpp-python {info['llama_cpp_python']}: n_vocab {info['n_vocab']}, BOS id {info['bos_id']}, "
          f"add_bos {info['add_bos']}; own tokenization of the text: {len(own)} ids vs quantkit's {len(ref)}, "
          f"first difference at {first_diff}")
    results = {"info": info, "sets": {}}
    for conv, s in data["sets"].items():
        if args.only and conv != args.only:
            continue
        windows = s["windows"]
        nll_sum, n_pred, window_nll, token_nll = 0.0, 0, [], []
        t0 = time.perf_counter()
        for w in windows:
            llm.reset()  # n_tokens = 0: eval() clears the KV cache from position 0 on
            llm.eval(w)
            logits = np.array(llm.scores[: len(w) - 1], dtype=np.float32)  # logits at positions 0..n-2
            nll = _log_softmax_nll(logits, np.asarray(w[1:]))
            window_nll.append(float(nll.mean()))
            token_nll.append(nll.tolist())
            nll_sum += float(nll.sum())
            n_pred += len(nll)
        seconds = time.perf_counter() - t0
        mean = nll_sum / n_pred
        results["sets"][conv] = {"ppl": math.exp(mean), "nll_mean": mean, "n_tokens": n_pred,
                                 "n_windows": len(windows), "seconds": seconds, "bos": s["bos"],
                                 "window_nll": window_nll, "token_nll": token_nll}
        print(f"llama.cpp {conv}: ppl {math.exp(mean):.4f} (nll {mean:.5f}, {n_pred} tokens, "
              f"{len(windows)} windows, {seconds:.1f} s)")
    Path(args.out).write_text(json.dumps(results))


# ----------------------------------------------------------------------------- both

def cmd_compare(args) -> None:
    work = Path(args.work_dir or f"/tmp/llamacpp_ppl_{Path(args.gguf).stem}")
    work.mkdir(parents=True, exist_ok=True)
    w, lj, qj = work / "windows.json", work / "llamacpp.json", work / "quantkit.json"
    me = str(Path(__file__).resolve())
    common = ["--threads", str(args.threads)]
    steps = [[sys.executable, me, "windows", args.gguf, "--out", str(w), "--seq-len", str(args.seq_len),
              "--max-tokens", str(args.max_tokens)],
             [args.llama_python, me, "score-llamacpp", str(w), "--out", str(lj)] + common
             + (["--kv-f32"] if args.kv_f32 else []),
             [sys.executable, me, "score-quantkit", str(w), "--out", str(qj)] + common
             + (["--per-window"] if args.per_window else [])]
    for cmd in steps:  # sequential: one heavy job at a time
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    data = json.loads(w.read_text())
    lres, qres = json.loads(lj.read_text()), json.loads(qj.read_text())
    print(f"\n{args.gguf} (seq_len {data['seq_len']}, max_tokens {data['max_tokens']}, "
          f"tokenizer default BOS: {data['default_bos']}, llama-cpp-python {lres['info']['llama_cpp_python']})")
    print("| convention | BOS id | windows | predicted tokens | quantkit ppl | llama.cpp ppl | quantkit / llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for conv in CONVENTIONS:
        if conv not in data["sets"]:
            continue
        q, l = qres["sets"][conv], lres["sets"][conv]
        print(f"| {conv} | {q['bos']} | {q['n_windows']} | {q['n_tokens']} | {q['ppl']:.3f} | {l['ppl']:.3f} | "
              f"{q['ppl'] / l['ppl']:.4f} |")
    if args.per_window:
        for conv in CONVENTIONS:
            if conv in data["sets"] and "window_nll" in qres["sets"][conv]:
                d = [a - b for a, b in zip(qres["sets"][conv]["window_nll"], lres["sets"][conv]["window_nll"])]
                print(f"{conv}: per-window NLL quantkit - llama.cpp: min {min(d):+.4f} max {max(d):+.4f} "
                      f"mean {sum(d) / len(d):+.4f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("windows")
    a.add_argument("gguf")
    a.add_argument("--out", required=True)
    a.add_argument("--seq-len", type=int, default=512)
    a.add_argument("--max-tokens", type=int, default=8192)
    for name in ("score-llamacpp", "score-quantkit"):
        a = sub.add_parser(name)
        a.add_argument("windows")
        a.add_argument("--out", required=True)
        a.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
        a.add_argument("--only", choices=CONVENTIONS, help="score one convention only")
        if name == "score-quantkit":
            a.add_argument("--per-window", action="store_true", help="also the NLL of each window and token")
        else:
            a.add_argument("--verbose", action="store_true")
            a.add_argument("--kv-f32", action="store_true", help="f32 KV cache (llama.cpp's default is f16)")
    a = sub.add_parser("compare")
    a.add_argument("gguf", help="a .gguf path, or smollm2-135m")
    a.add_argument("--llama-python", required=True, help="the Python with llama-cpp-python installed")
    a.add_argument("--work-dir")
    a.add_argument("--seq-len", type=int, default=512)
    a.add_argument("--max-tokens", type=int, default=8192)
    a.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a.add_argument("--per-window", action="store_true")
    a.add_argument("--kv-f32", action="store_true", help="f32 KV cache on the llama.cpp side")
    args = p.parse_args(argv)
    {"windows": cmd_windows, "score-llamacpp": cmd_score_llamacpp, "score-quantkit": cmd_score_quantkit,
     "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
