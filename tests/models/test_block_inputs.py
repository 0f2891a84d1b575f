"""Calibration activations carried block to block (quantkit/models/block_inputs.py): every
row replayed through a block sees exactly what the whole-model forward gives that block.

The regression this guards: transformers 5.25 passes the KV cache to decoder layers as
``cache`` (it was ``past_key_values``); a captured cache object kept in the replay kwargs
is shared by all rows, so row i attended to rows 0..i-1 and the streamed BitStack artifact
differed from the whole-model one (first seen as "streamed bytes differ at byte 831")."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from quantkit.models.block_inputs import capture, replay_kwargs


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _layer_inputs(model, layer_index: int, ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states entering layer ``layer_index`` in the whole-model forward, one per row."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handle = model.model.layers[layer_index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in ids:
                model.model(row[None], use_cache=False)
    finally:
        handle.remove()
    return seen


def test_replayed_rows_equal_the_whole_forward(model):
    ids = torch.randint(0, model.config.vocab_size, (4, 40), generator=torch.Generator().manual_seed(0))
    inputs = capture(model, model.model.layers[0], ids)
    assert torch.equal(inputs.x, torch.cat(_layer_inputs(model, 0, ids)))
    # the same code path (batch 1, same kwargs) on the same CPU: bit-identical, every row
    want = _layer_inputs(model, 1, ids)
    for i in range(len(ids)):
        assert torch.equal(inputs.run_row(model.model.layers[0], i), want[i][0]), f"row {i}"
    assert torch.equal(inputs.run(model.model.layers[0]), torch.cat(want))


def test_replay_kwargs_drop_every_cache_spelling():
    cache = DynamicCache()
    kw = replay_kwargs({"hidden_states": torch.ones(1), "past_key_values": cache, "past_key_value": cache,
                        "cache": cache, "my_cache": cache, "position_ids": torch.arange(3), "use_cache": True})
    assert set(kw) == {"position_ids", "use_cache"} and kw["use_cache"] is False
