"""Shared fixtures: a tiny Llama checkpoint with a real (tiny) tokenizer, built offline."""

import os
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _train_tokenizer(text: str, vocab_size: int = 320, bos: bool = False):
    """A byte-level BPE trained in well under a second on quantkit's calibration text.

    bos: give it a "<bos>" token that it puts before every text by default (as Gemma's and
    Llama-3's tokenizers do); otherwise it adds nothing (as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<eos>", "<bos>"] if bos else ["<eos>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="session")
def plain_tokenizer():
    """A tiny tokenizer that adds nothing to a text (as SmolLM2's)."""
    from quantkit.models.text import default_text

    return _train_tokenizer(default_text("calib")[:100_000])


@pytest.fixture(scope="session")
def bos_tokenizer():
    """A tiny tokenizer that starts every text with its BOS "<bos>" by default."""
    from quantkit.models.text import default_text

    return _train_tokenizer(default_text("calib")[:100_000], bos=True)


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


@dataclass(frozen=True)
class _RecordConfig:
    n_samples: int = 2
    seq_len: int = 16


@pytest.fixture
def record_pass(monkeypatch):
    """A calibrated pass "record" that keeps the windows it is handed (the list yielded)."""
    from quantkit.passes import PASSES, PassSpec

    seen = []

    def apply(model, cfg, progress, scope="", calib=None):
        seen.append(calib.batches(cfg.n_samples, cfg.seq_len))
        return ["model.layers.0.mlp.up_proj"]

    monkeypatch.setitem(PASSES, "record", PassSpec("record", _RecordConfig, apply, "test", calibrated=True))
    yield seen


@pytest.fixture
def float_shapes():
    """A TorchDispatchMode class recording, for ops run under it, the shape of every floating
    tensor returned (``.shapes``) and of every dequantize op's result (``.dequant_calls``):
    the no-dense-weight checks of the chunked backward and of LoRA training."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FloatShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes, self.dequant_calls = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.shapes.append(tuple(t.shape))
                    if "dequantize" in str(func):
                        self.dequant_calls.append(tuple(t.shape))
            return out

    return FloatShapes
