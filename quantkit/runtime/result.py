"""What one generate call returns: the new ids and text, token counts and the timing split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class GenerateResult:
    """One generate call. Times are wall seconds (time.perf_counter)."""

    ids: list                   # the new token ids (int), EOS included when it stopped there
    text: str                   # their text (special tokens skipped)
    prompt_tokens: int
    new_tokens: int             # len(ids)
    prefill_seconds: float      # the prompt's forward, which also yields the first new token
    decode_seconds: float       # the new_tokens - 1 one-token forwards after it (sampling, streaming included)
    stopped: str                # "eos" or "max_new_tokens"
    runtime: str                # "static-cache" (this loop) or "model.generate" (the fallback)
    threads: int                # torch.get_num_threads() during the run
    fallback_reason: Optional[str] = field(default=None)

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the one-token steps (the prefill's token is not counted)."""
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")

    def stats_line(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens at {self.prompt_tokens_per_s:.1f} tok/s, "
                f"decode {self.new_tokens} tokens at {self.decode_tokens_per_s:.1f} tok/s "
                f"({self.threads} threads, stopped at {self.stopped}, {self.runtime})")

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
                "prompt_tokens_per_s": self.prompt_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "stopped": self.stopped, "runtime": self.runtime, "threads": self.threads,
                "fallback_reason": self.fallback_reason}
