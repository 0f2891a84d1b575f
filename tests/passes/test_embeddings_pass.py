"""The embeddings pass (quantkit/passes/embeddings.py): packed token embedding and output head,
tied tables stored once, save/load, memory accounting, Gemma's scaled embedding, bad input.

Kernel-vs-reference tests of the lookups are in tests/ops/test_embedding_kernel.py; quality
(error vs fp32) is separate, at the end."""

import pytest
import torch
from safetensors import safe_open
from torch import nn

import quantkit
from quantkit.errors import RecipeError, UsageError
from quantkit.io import artifact
from quantkit.nn import DenseEmbedding, DenseLinear, IntKEmbedding, IntKLinear, Lut4Embedding, Lut4Linear, TiedHead
from quantkit.passes import embeddings
from quantkit.recipe import load_recipe

FORMATS = {"int8": (IntKEmbedding, IntKLinear), "nf4": (Lut4Embedding, Lut4Linear), "fp4": (Lut4Embedding, Lut4Linear),
           "bfloat16": (DenseEmbedding, DenseLinear), "float16": (DenseEmbedding, DenseLinear)}


def _recipe(embed, head, **kw):
    return {"version": 1, "name": "emb", "passes": [{"pass": "nf4", "targets": ["re:.*"], "ignore": ["lm_head"]},
                                                    {"pass": "embeddings", "embed": embed, "head": head, **kw}]}


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("untied")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _keys(out):
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tied_table_is_stored_and_held_once(tiny_llama_dir, tmp_path, fmt):
    model = quantkit.compress(str(tiny_llama_dir), _recipe(fmt, fmt), progress=False)
    emb_cls, _ = FORMATS[fmt]
    assert type(model.model.embed_tokens) is emb_cls and isinstance(model.lm_head, TiedHead)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    ref = model(ids).logits
    quantkit.save(model, tmp_path / "o")
    keys = _keys(tmp_path / "o")
    assert not any(k.startswith("lm_head") for k in keys)  # the head reads the embedding's table
    loaded = quantkit.load(tmp_path / "o")
    assert isinstance(loaded.lm_head, TiedHead) and loaded.lm_head.embedding is loaded.model.embed_tokens
    assert torch.equal(loaded(ids).logits, ref)
    # the head computes x @ table.T with the very table the lookup decodes
    x = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(loaded.lm_head(x), x @ loaded.model.embed_tokens.dequantized_weight().T,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("embed,head", [("int8", "keep"), ("keep", "int8"), ("nf4", "int8"), ("bfloat16", "fp4")])
def test_a_tied_head_asked_for_another_format_is_untied(tiny_llama_dir, tmp_path, embed, head):
    model = quantkit.compress(str(tiny_llama_dir), _recipe(embed, head), progress=False)
    want_emb = nn.Embedding if embed == "keep" else FORMATS[embed][0]
    want_head = nn.Linear if head == "keep" else FORMATS[head][1]
    assert type(model.model.embed_tokens) is want_emb and type(model.lm_head) is want_head
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    ref = model(ids).logits
    quantkit.save(model, tmp_path / "o")
    assert any(k.startswith("lm_head.weight") for k in _keys(tmp_path / "o"))
    assert torch.equal(quantkit.load(tmp_path / "o")(ids).logits, ref)


@pytest.mark.parametrize("fmt", ["int8", "nf4", "bfloat16"])
def test_untied_model_packs_both(untied_dir, tmp_path, fmt):
    model = quantkit.compress(str(untied_dir), _recipe(fmt, fmt), progress=False)
    emb_cls, head_cls = FORMATS[fmt]
    assert type(model.model.embed_tokens) is emb_cls and type(model.lm_head) is head_cls
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    ref = model(ids).logits
    quantkit.save(model, tmp_path / "o")
    assert torch.equal(quantkit.load(tmp_path / "o")(ids).logits, ref)


def test_artifact_is_smaller_and_memory_counts_the_table_once(tiny_llama_dir, tmp_path):
    nf4_only = {"version": 1, "name": "n", "passes": [{"pass": "nf4", "targets": ["re:.*"], "ignore": ["lm_head"]}]}
    a = quantkit.compress(str(tiny_llama_dir), nf4_only, progress=False)
    b = quantkit.compress(str(tiny_llama_dir), _recipe("int8", "int8"), progress=False)
    quantkit.save(a, tmp_path / "a")
    quantkit.save(b, tmp_path / "b")
    v, d = a.config.vocab_size, a.config.hidden_size
    def tensor_bytes(out):
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in artifact.read_metadata(out)["tensors"].values())

    saved = tensor_bytes(tmp_path / "a") - tensor_bytes(tmp_path / "b")
    # fp32 table (4 B) -> int8 codes (1 B) + one fp32 scale per row, stored once for both uses
    assert saved == v * d * 4 - (v * d + 4 * v)
    la, lb = quantkit.load(tmp_path / "a"), quantkit.load(tmp_path / "b")
    assert la._quantkit_memory_bytes - lb._quantkit_memory_bytes == v * d * 4 - (v * d + 4 * v)


def test_gemma_scaled_embedding_matches_the_original_module(tmp_path):
    """Gemma multiplies looked-up rows by sqrt(hidden): the packed lookup must do the same."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                           sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    emb = model.model.embed_tokens
    assert type(emb).__name__ == "Gemma3TextScaledWordEmbedding" and float(emb.embed_scale) != 1.0
    ids = torch.randint(0, 300, (2, 13))
    out = embeddings.apply(model, embeddings.EmbeddingsPassConfig(embed="int8", head="int8"), progress=False)
    assert out == ["model.embed_tokens", "lm_head"]
    packed = model.model.embed_tokens
    assert packed.embed_scale == float(emb.embed_scale)
    emb.weight.data = packed.dequantized_weight()  # the original module on the decoded table
    assert torch.equal(packed(ids), emb(ids))
    # and the whole model round-trips through an artifact with the scale in the spec
    model.config.save_pretrained(tmp_path / "cfg")
    quantkit.save(model, tmp_path / "o")
    loaded = quantkit.load(tmp_path / "o")
    assert loaded.model.embed_tokens.embed_scale == packed.embed_scale
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bf16_model_gets_rows_in_bf16(tiny_llama_dir):
    model = quantkit.compress(str(tiny_llama_dir), _recipe("int8", "int8"), progress=False).to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    assert model.model.embed_tokens(ids).dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.uint8  # the codes are the format
    assert model(ids).logits.dtype == torch.bfloat16


def test_recipe_keys_are_strict(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'emb'.*valid keys: blocksize, double_quant, embed, head"):
        load_recipe({"version": 1, "name": "x", "passes": [{"pass": "embeddings", "emb": "int8"}]})
    with pytest.raises(RecipeError, match=r"'embed' must be one of 'keep', 'bfloat16', 'float16', 'int8', 'nf4', "
                                          r"'fp4', got 'int4'"):
        load_recipe({"version": 1, "name": "x", "passes": [{"pass": "embeddings", "embed": "int4"}]})
    with pytest.raises(RecipeError, match="'blocksize' must be one of"):
        load_recipe({"version": 1, "name": "x", "passes": [{"pass": "embeddings", "blocksize": 48}]})


def test_unknown_embedding_module_is_refused():
    class Odd(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = Odd(10, 4)

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(UsageError, match="Odd has a forward of its own.*embed: keep"):
        embeddings.apply(M(), embeddings.EmbeddingsPassConfig(), progress=False)


def test_quality_int8_rows_within_half_a_step():
    """Symmetric round-to-nearest: every element within scale/2 of the original (scale =
    max|row| / 127), all-zero rows stay zero; nf4 within half the widest gap of the nf4 table
    (0.304, between -1 and -0.696) times the block's absmax."""
    from quantkit.formats import intk, lut4

    w = torch.randn(257, 96)
    w[5] = 0
    q = intk.quantize_rows(w, 8)
    err = (intk.dequantize(q) - w).abs()
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(intk.dequantize(q)[5], torch.zeros(96))
    assert int(intk.unpack_codes(q.packed, 8, 96).min()) >= 1  # -128 never produced
    w = w[:256]  # 256 x 96 = 384 blocks of 64
    n4 = lut4.quantize(w, "nf4", 64, False)
    blocks = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    gap = float(lut4.code_table("nf4").sort().values.diff().max())
    assert ((lut4.dequantize(n4).reshape(-1, 64) - w.reshape(-1, 64)).abs() <= blocks * gap / 2 + 1e-6).all()


@pytest.mark.parametrize("embed,head", [("int8", "int8"), ("nf4", "bfloat16"), ("bfloat16", "int8")])
def test_format_doc_names_every_spec_field(untied_dir, tiny_llama_dir, tmp_path, embed, head):
    """docs/format.md's embeddings section documents each field the specs carry."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "format.md").read_text(encoding="utf-8")
    for src in (untied_dir, tiny_llama_dir):
        out = quantkit.save(quantkit.compress(str(src), _recipe(embed, head), progress=False), tmp_path / src.name)
        info = artifact.read_metadata(out)
        for name in ("model.embed_tokens", "lm_head"):
            spec = info["modules"][name]
            assert f"`{spec['format']}`" in doc
            for field in spec:
                assert f'"{field}"' in doc, f"spec field {field!r} of {spec['format']} is not in docs/format.md"
        if embed == "int8":
            t = info["tensors"]
            assert t["model.embed_tokens.weight"]["dtype"] == "U8" and t["model.embed_tokens.weight_scale"]["dtype"] == "F32"


def test_shipped_nf4_recipe_on_a_model_without_embeddings():
    """A plain MLP has no token embedding: the embeddings pass has nothing to do, which is
    not a recipe mistake (PassSpec.may_match_nothing); the linears are still quantized."""
    from quantkit.nn import Lut4Linear as L4

    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    out = quantkit.compress(mlp, "nf4", progress=False)
    assert isinstance(out[0], L4) and isinstance(out[2], L4)
