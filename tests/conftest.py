"""Shared fixtures: a tiny Llama checkpoint with a real (tiny) tokenizer, built offline."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _train_tokenizer(text: str, vocab_size: int = 320):
    """A byte-level BPE trained in well under a second on quantkit's calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Folder with config.json, model.safetensors and tokenizer files of a 2-layer Llama.

    hidden 64 / intermediate 128 / 4 heads / 2 KV heads: every Linear is a multiple of 64
    wide except none, so block-64 quantization exercises the common path; tied embeddings
    exercise the tied-weight handling of save/load.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.models.text import default_text

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = _train_tokenizer(default_text("calib")[:200_000])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
