"""The tokenizer saved with an artifact: tokenizer.json written compact (a 262k-vocabulary
tokenizer is 43 % of its pretty-printed size), read back to the same token ids."""

import json

from transformers import AutoTokenizer

import quantkit
from quantkit.models.text import default_text


def test_tokenizer_json_is_compact_and_equivalent(tiny_llama_dir, tmp_path):
    src = AutoTokenizer.from_pretrained(tiny_llama_dir)
    out = quantkit.save(quantkit.load_model(str(tiny_llama_dir)), tmp_path / "o", tokenizer=src)
    raw = (out / "tokenizer.json").read_text(encoding="utf-8")
    assert "\n" not in raw.strip() and json.loads(raw)["model"]["vocab"]  # one line, still the full JSON
    assert len(raw) < len((tiny_llama_dir / "tokenizer.json").read_text(encoding="utf-8"))
    text = default_text("eval")[:5000]
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == src(text)["input_ids"]
