"""Incremental detokenization: the text of each new token, without splitting multi-byte characters."""

from __future__ import annotations


class TextStream:
    """Turns a growing list of generated ids into printable text pieces.

    Byte-level BPE tokens can end inside a UTF-8 character; decoding token by token would
    print U+FFFD there. So each push decodes *all* the ids so far and returns only the new
    suffix, holding it back while it ends in an incomplete character (U+FFFD). Decoding the
    whole list is O(n) per token, negligible next to a model forward for the lengths a
    single generate produces.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        """Add one id; the text that became final (may be "")."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        return self._take(text)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        piece = text[self.printed:]
        # a tokenizer may rewrite earlier text when more ids arrive (cleanup of spaces):
        # never go back, only print what lies past what was printed
        self.printed = max(self.printed, len(text))
        return piece
