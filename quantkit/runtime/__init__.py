"""The CPU decode runtime: ``generate`` (prefill + static-cache decode loop, greedy or
seeded sampling, streamed text) and its ``GenerateResult``.

    generate.py     the loop, the checks (empty prompt, max_new_tokens, context), the result
    sampling.py     next token from logits: argmax or temperature + top-p
    text_stream.py  incremental detokenization that never splits a UTF-8 character
    fallback.py     model.generate for architectures without static-cache support
"""

from quantkit.runtime.generate import GenerateResult, generate

__all__ = ["generate", "GenerateResult"]
