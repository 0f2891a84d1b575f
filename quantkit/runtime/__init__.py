"""The CPU decode runtime: ``generate`` (prefill + static-cache decode loop, greedy or
seeded sampling, streamed text) and its ``GenerateResult``.

    generate.py     the loop and the checks (empty prompt, max_new_tokens, context); engines
    decoder_plan.py which modules of a Llama/Qwen2/Mistral/Gemma3 decoder the lean forward calls
    lean_forward.py the lean forward and its KV cache (none of transformers' per-call glue)
    result.py       GenerateResult: ids, text, counts, prefill/decode seconds and tok/s
    model_info.py   context length, EOS ids, device, static-cache support of a model
    sampling.py     next token from logits: argmax or temperature + top-p
    text_stream.py  incremental detokenization that never splits a UTF-8 character
    fallback.py     model.generate for architectures without static-cache support
"""

from quantkit.runtime.generate import generate
from quantkit.runtime.result import GenerateResult

__all__ = ["generate", "GenerateResult"]
