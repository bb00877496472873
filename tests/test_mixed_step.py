import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from steer.runtime.model_runner import decode_step, left_pad, prefill
from steer.runtime.mixed_step import ATTENTION_NAME, MIXED_STEP_MODEL_TYPES, JoiningPrompt, fits, mixed_step, \
    supports_mixed_step

RUNNING = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20]]
STEP_TOKENS = [[21, 22, 23, 24], [25, 26, 27, 28], [29, 30, 31, 32]]


@torch.inference_mode()
def _running_batch(model, free=(1, 2)):
    """Four rows decoded for three steps, then ``free`` rows freed the way the server frees them."""
    _, state = prefill(model, *left_pad(RUNNING, pad_token_id=0))
    for tokens in STEP_TOKENS:
        decode_step(model, torch.tensor(tokens), state)
    for row in free:
        state.attention_mask[row] = 0
    return state


@torch.inference_mode()
def _alone(model, prompt, fed):
    """The prompt alone: its first logits, then the logits after each token of ``fed``."""
    logits, state = prefill(model, *left_pad([prompt], pad_token_id=0))
    out = [logits[0]]
    for token in fed:
        out.append(decode_step(model, torch.tensor([token]), state)[0])
    return out


@pytest.mark.parametrize("joining", [{1: [40, 41, 42, 43, 44, 45]}, {1: [40, 41, 42, 43, 44, 45], 2: [50, 51, 52]},
                                     {2: [60]}, {1: [40, 41, 42, 43, 44, 45], 2: [60]}])
def test_joining_rows_decode_as_if_alone_and_running_rows_as_if_nothing_joined(tiny_llama, joining):
    _check_mixed_step(tiny_llama, joining)


# Running row 0 has cached 5..11 then 21, 25, 29; row 3 has 18, 19, 20 then 24, 28, 32 (see _running_batch).
@pytest.mark.parametrize("joining", [
    {1: ([5, 6, 7, 8, 9, 10, 11, 21, 40, 41], 0, 8)},  # copies 8 tokens, feeds one more, then its last
    {2: ([18, 19, 20, 24, 28, 50], 3, 5)},  # copies all but its last token: feeds nothing
    {1: ([5, 6, 7, 60, 61, 62, 63], 0, 3), 2: ([50, 51, 52], -1, 0)},  # one copies, one is fed whole
    {1: ([5, 6, 7, 8, 9, 10, 11, 21, 25, 29, 70], 0, 10), 2: ([18, 19, 20, 24, 80, 81, 82, 83, 84], 3, 4)},
    # Both copy all but their last token (the step is a plain decode step), from running rows ...
    {1: ([5, 6, 7, 8, 9, 10, 11, 21, 25, 29, 90], 0, 10), 2: ([18, 19, 20, 24, 28, 32, 91], 3, 6)},
    # ... and from what freed row 1 still holds (12, 13, 22, 26, 30), which row 1 itself takes over,
    # or which row 2 reads while row 1 is overwritten by a copy from row 0 in the same step.
    {1: ([12, 13, 22, 26, 30, 95], 1, 5), 2: ([12, 13, 22, 96], 1, 3)},
    {1: ([5, 6, 7, 8, 9, 10, 11, 21, 94], 0, 8), 2: ([12, 13, 22, 96], 1, 3)},
])
def test_joining_rows_that_copy_a_running_rows_cache_decode_as_if_alone(tiny_llama, joining):
    _check_mixed_step(tiny_llama, joining)


def test_a_copy_must_come_from_what_the_source_row_holds(tiny_llama):
    state = _running_batch(tiny_llama)
    with pytest.raises(ValueError, match="cannot lend"):  # row 3 holds 6 tokens
        mixed_step(tiny_llama, torch.tensor([1, 0, 0, 1]), state, [JoiningPrompt(1, list(range(20, 30)), 3, 7)])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_every_architecture_allowed_the_mixed_step_matches_a_separate_prefill(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    if family == "mistral":  # its default sliding window gives a cache the mixed step cannot write
        windowed = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, sliding_window=4, **shape)).eval()
        assert not supports_mixed_step(windowed, _running_batch(windowed))
        shape["sliding_window"] = None
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shape), attn_implementation="sdpa").eval()
    assert family in MIXED_STEP_MODEL_TYPES and supports_mixed_step(model, _running_batch(model))
    _check_mixed_step(model, {1: [40, 41, 42, 43, 44, 45], 2: [50, 51, 52]})
    _check_mixed_step(model, {1: ([5, 6, 7, 8, 9, 10, 11, 21, 40, 41], 0, 8), 2: [50, 51, 52]})


def _check_mixed_step(model, joining):
    """``joining`` maps a free batch row to its prompt, or to (prompt, source row, tokens copied)."""
    joining = {row: entry if isinstance(entry, tuple) else (entry, -1, 0) for row, entry in joining.items()}
    pending = torch.tensor([33, 0, 0, 34])
    fed = [[70, 71, 72, 73], [74, 75, 76, 77], [78, 79, 80, 81]]

    plain = _running_batch(model)
    expected_running = [decode_step(model, pending, plain)]
    for tokens in fed:
        expected_running.append(decode_step(model, torch.tensor(tokens), plain))

    state = _running_batch(model)
    got = [mixed_step(model, pending, state, [JoiningPrompt(row, *entry) for row, entry in joining.items()])]
    for tokens in fed:
        got.append(decode_step(model, torch.tensor(tokens), state))

    for row in (0, 3):  # untouched by what joined
        for step, expected in enumerate(expected_running):
            torch.testing.assert_close(got[step][row], expected[row], rtol=0, atol=1e-5)
    for row, (prompt, _, _) in joining.items():
        alone = _alone(model, prompt, [tokens[row] for tokens in fed])
        for step, expected in enumerate(alone):
            torch.testing.assert_close(got[step][row], expected, rtol=0, atol=1e-5)
    assert model.config._attn_implementation != ATTENTION_NAME  # restored after the step


def test_a_prompt_longer_than_the_batch_is_refused(tiny_llama):
    state = _running_batch(tiny_llama)
    width = state.attention_mask.shape[1]
    assert fits(state, width + 1) and not fits(state, width + 2) and not fits(state, 0)
    with pytest.raises(ValueError, match="does not fit"):
        mixed_step(tiny_llama, torch.tensor([1, 0, 0, 1]), state, [(1, list(range(3, width + 5)))])


def test_only_models_and_caches_it_was_checked_for_take_the_mixed_step(tiny_llama):
    assert supports_mixed_step(tiny_llama, _running_batch(tiny_llama))
    assert not supports_mixed_step(tiny_llama, None)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    _, state = prefill(gpt2, *left_pad([[5, 6, 7]], pad_token_id=0))
    assert not supports_mixed_step(gpt2, state)


def test_the_shared_prefix_length_agrees_with_a_token_by_token_count():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from steer.runtime.rows import common_prefix_length

    def oracle(a, b, limit):
        n = 0
        while n < min(len(a), len(b), limit) and a[n] == b[n]:
            n += 1
        return n

    tokens = st.lists(st.integers(0, 3), max_size=40)

    @settings(max_examples=300, derandomize=True, deadline=None)
    @given(tokens, tokens, st.integers(0, 45))
    def check(a, b, limit):
        assert common_prefix_length(a, b, limit) == oracle(a, b, limit)
        assert common_prefix_length(a, a + b) == len(a)

    check()
