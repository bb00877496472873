import torch
from transformers import DynamicCache

from steer.runtime.compat import with_cache as _with_cache
from steer.runtime.model_runner import decode_step, left_pad, prefill
from steer.runtime.kv_cache import PreallocatedLayer, new_kv_cache


def _decode(model, cache, steps=40):
    """Greedy decode of a left-padded batch of two; returns every step's logits."""
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11]], pad_token_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = []
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **_with_cache(model, cache),
                       use_cache=True).logits[:, -1]
        nxt = positions[:, -1:] + 1
        for _ in range(steps):
            out.append(logits)
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            logits = model(input_ids=logits.argmax(-1, keepdim=True), attention_mask=mask, position_ids=nxt,
                           **_with_cache(model, cache), use_cache=True).logits[:, -1]
            nxt = nxt + 1
    return torch.stack(out)


def test_preallocated_cache_decodes_exactly_like_dynamic_cache(tiny_llama):
    cache = new_kv_cache(tiny_llama.config)
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    expected = _decode(tiny_llama, DynamicCache(config=tiny_llama.config))
    assert torch.equal(_decode(tiny_llama, cache), expected)
    assert cache.get_seq_length() == 5 + 40


def test_appending_writes_in_place_until_the_buffer_is_full(tiny_llama):
    layer = PreallocatedLayer()
    k = torch.randn(2, 2, 10, 8)
    layer.update(k, k.clone())
    buffer = layer._key_buffer
    capacity = buffer.shape[-2]
    assert capacity > 10
    for _ in range(capacity - 10):
        step = torch.randn(2, 2, 1, 8)
        keys, _ = layer.update(step, step)
        assert layer._key_buffer is buffer  # no copy of the cache per token
        assert torch.equal(keys[:, :, -1:], step)
    keys, _ = layer.update(torch.ones(2, 2, 1, 8), torch.ones(2, 2, 1, 8))
    assert layer._key_buffer is not buffer and layer._key_buffer.shape[-2] > capacity + 1
    assert torch.equal(keys[:, :, :10], k) and keys.shape[-2] == capacity + 1


def test_rows_selected_or_keys_replaced_from_outside_are_adopted():
    """The server trims rows and columns by assigning keys/values; the next update must build on
    exactly those tensors, not on stale buffer contents."""
    layer = PreallocatedLayer()
    k = torch.arange(3 * 1 * 6 * 2, dtype=torch.float32).view(3, 1, 6, 2)
    layer.update(k, k)
    layer.batch_select_indices(torch.tensor([2, 0]))
    step = torch.full((2, 1, 1, 2), -1.0)
    keys, values = layer.update(step, step)
    assert torch.equal(keys, torch.cat([k[[2, 0]], step], dim=2)) and torch.equal(values, keys)
    # Dropping leading (padding) columns through a slice of the same storage.
    layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]
    keys, _ = layer.update(step * 2, step * 2)
    assert torch.equal(keys, torch.cat([k[[2, 0]][:, :, 3:], step, step * 2], dim=2))
    layer.crop(-2)
    keys, _ = layer.update(step * 3, step * 3)
    assert torch.equal(keys, torch.cat([k[[2, 0]][:, :, 3:], step * 3], dim=2))


def test_generation_primitives_use_it(tiny_llama):
    ids, mask = left_pad([[5, 6, 7]], pad_token_id=0)
    logits, state = prefill(tiny_llama, ids, mask)
    assert isinstance(state.past_key_values.layers[0], PreallocatedLayer)
    decode_step(tiny_llama, logits.argmax(-1), state)
    assert state.past_key_values.get_seq_length() == 4


def test_one_token_steps_match_transformers_own_masking(tiny_llama):
    """decode_step hands SDPA a ready [batch, 1, 1, length] mask for padded batches; the logits must
    be what transformers computes from the 2D padding mask itself."""
    assert tiny_llama.config._attn_implementation == "sdpa"
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], pad_token_id=0)
    logits, state = prefill(tiny_llama, ids, mask)
    reference = DynamicCache(config=tiny_llama.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        tiny_llama(input_ids=ids, attention_mask=mask, position_ids=positions, **_with_cache(tiny_llama, reference))
        next_positions = positions[:, -1:] + 1
        for _ in range(6):
            tokens = logits.argmax(-1)
            logits = decode_step(tiny_llama, tokens, state)
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            expected = tiny_llama(input_ids=tokens.view(-1, 1), attention_mask=mask, position_ids=next_positions,
                                  **_with_cache(tiny_llama, reference)).logits[:, -1]
            next_positions = next_positions + 1
            assert torch.allclose(logits, expected, atol=1e-6)


def test_decode_steps_of_a_sliding_window_model_match_a_full_forward():
    """Sliding-window layers keep fewer columns than the batch's mask; decode_step must let
    transformers build their masks (a ready full-length mask used to crash the step)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                             sliding_window=4, max_position_embeddings=256)).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    fed = [[20, 21], [22, 23], [24, 25], [26, 27]]
    with torch.inference_mode():
        _, state = prefill(model, *left_pad(prompts, pad_token_id=0))
        for step, tokens in enumerate(fed, start=1):
            got = decode_step(model, torch.tensor(tokens), state)
            for row, prompt in enumerate(prompts):
                sequence = torch.tensor([prompt + [t[row] for t in fed[:step]]])
                expected = model(input_ids=sequence).logits[0, -1]
                torch.testing.assert_close(got[row], expected, rtol=0, atol=1e-5)
