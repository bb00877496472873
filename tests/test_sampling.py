import pytest
import torch

from steer.runtime.sampling import SamplingError, SamplingParams, filter_top_p, sample_next_tokens
from steer.runtime.stopping import find_stop, stop_prefixes, streamable_length


def test_params_validation():
    with pytest.raises(SamplingError, match="temperature") as e:
        SamplingParams(temperature=3)
    assert e.value.field == "temperature"
    for kwargs, field in [({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop")]:
        with pytest.raises(SamplingError) as e:
            SamplingParams(**kwargs)
        assert e.value.field == field
    assert SamplingParams(stop="x").stop == ["x"]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert torch.equal(filter_top_p(probs, 0.7) > 0, torch.tensor([True, True, False, False]))
    assert torch.equal(filter_top_p(probs, 0.1) > 0, torch.tensor([True, False, False, False]))


def nucleus(probs, top_p: float) -> dict[int, float]:
    """The oracle the sampler is checked against, written independently of steer.sampling: sort
    the tokens by probability, keep them until the kept mass reaches top_p, renormalise."""
    probs = [float(p) for p in probs]
    total = sum(probs)
    kept, mass = [], 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        kept.append(token)
        mass += probs[token] / total
        if mass >= top_p:
            break
    return {token: probs[token] / total / mass for token in kept}


def assert_clear_of_the_boundary(probs, top_p: float) -> None:
    """The nucleus must not hinge on float rounding (float32 sums in the sampler, float64 here)."""
    cumulative, mass = [], 0.0
    for p in sorted((float(p) for p in probs), reverse=True):
        mass += p
        cumulative.append(mass)
    assert top_p >= 1.0 or min(abs(c - top_p) for c in cumulative) > 1e-4


def test_the_oracle_keeps_the_smallest_nucleus():
    assert set(nucleus([0.15, 0.5, 0.05, 0.3], 0.7)) == {1, 3}
    assert nucleus([0.15, 0.5, 0.05, 0.3], 0.1) == {1: 1.0}
    assert set(nucleus([0.15, 0.5, 0.05, 0.3], 1.0)) == {0, 1, 2, 3}


def test_seeded_row_is_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = sample_next_tokens(logits[2:3], [p], [p.make_rng()])
    others = [SamplingParams(seed=s) for s in (1, 2, 3)]
    batch_params = [others[0], others[1], p, others[2]]
    batch = sample_next_tokens(logits, batch_params, [q.make_rng() for q in batch_params])
    assert batch[2] == alone[0]
    greedy = SamplingParams(temperature=0)
    assert sample_next_tokens(logits, [greedy] * 4, [greedy.make_rng()] * 4).tolist() == logits.argmax(-1).tolist()


def test_mixed_params_in_one_batch_match_each_row_alone():
    """Rows are grouped by (temperature, top_p); every row still gets the token it gets alone,
    step after step, with greedy rows consuming no randomness."""
    torch.manual_seed(0)
    for trial in range(10):
        logits = torch.randn(12, 512) * 3
        params = [SamplingParams(temperature=(0.7, 1.0, 0.0)[i % 3], top_p=(0.9, 1.0, 0.5)[i % 3],
                                 seed=trial * 50 + i) for i in range(12)]
        alone = [p.make_rng() for p in params]
        batched = [p.make_rng() for p in params]
        for _ in range(3):
            step = logits + torch.randn_like(logits)
            expected = torch.cat([sample_next_tokens(step[i:i + 1], [p], [alone[i]]) for i, p in enumerate(params)])
            assert torch.equal(sample_next_tokens(step, params, batched), expected)


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_draws_follow_the_oracle_nucleus(top_p):
    """20,000 draws from a known distribution: frequencies match the oracle's nucleus,
    renormalised, and nothing outside it is ever drawn."""
    torch.manual_seed(1)
    logits = torch.randn(1, 200) * 2
    probs = torch.softmax(logits.double(), dim=-1)[0].tolist()
    assert_clear_of_the_boundary(probs, top_p)
    oracle = nucleus(probs, top_p)
    expected = torch.tensor([oracle.get(t, 0.0) for t in range(200)], dtype=torch.float64)
    rows = 20_000
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=i) for i in range(rows)]
    tokens = sample_next_tokens(logits.expand(rows, -1), params, [p.make_rng() for p in params])
    counts = torch.bincount(tokens, minlength=200).double()
    assert counts[expected == 0].sum() == 0
    # Within 5 standard deviations of a binomial count, for every token.
    sd = (rows * expected * (1 - expected)).sqrt().clamp(min=1.0)
    assert ((counts - rows * expected).abs() <= 5 * sd).all()


def test_temperature_scales_before_the_nucleus_is_cut():
    """top_p applies to the tempered distribution, as in the oracle fed softmax(logits / T)."""
    torch.manual_seed(2)
    logits = torch.randn(1, 64) * 3
    temperature, top_p = 0.5, 0.8
    probs = torch.softmax(logits.double() / temperature, dim=-1)[0].tolist()
    assert_clear_of_the_boundary(probs, top_p)
    oracle = nucleus(probs, top_p)
    rows = 5000
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=i) for i in range(rows)]
    tokens = sample_next_tokens(logits.expand(rows, -1), params, [p.make_rng() for p in params])
    drawn = set(tokens.tolist())
    assert drawn <= set(oracle)
    assert {t for t, p in oracle.items() if p > 0.01} <= drawn


def test_wide_nucleus_falls_back_to_a_full_sort():
    """A flat distribution needs far more than the top-k candidates to reach top_p; the fallback
    must give the oracle's nucleus (draws stay inside it and cover it)."""
    import steer.runtime.sampling as sampling

    logits = torch.zeros(1, 1000)
    logits[0, :500] = 0.01 * torch.arange(500, dtype=torch.float32)  # mass spread over many tokens
    probs = torch.softmax(logits.double(), dim=-1)[0].tolist()
    assert_clear_of_the_boundary(probs, 0.9)
    oracle = set(nucleus(probs, 0.9))
    assert len(oracle) > sampling.NUCLEUS_CANDIDATES[0]
    rows = 4000
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=i) for i in range(rows)]
    tokens = sample_next_tokens(logits.expand(rows, -1), params, [p.make_rng() for p in params])
    assert set(tokens.tolist()) <= oracle
    assert len(set(tokens.tolist())) > sampling.NUCLEUS_CANDIDATES[0]


def test_each_row_draws_the_same_token_whichever_candidate_tier_holds_its_nucleus():
    """Rows whose nucleus fits the top-32, the top-1024, or only the full sort (a 4,000-token
    vocabulary), mixed in one batch: each row draws exactly the token that inverting the oracle's
    sorted nucleus gives for that row's uniform."""
    import random

    import steer.runtime.sampling as sampling

    torch.manual_seed(3)
    vocab, top_p = 4000, 0.9

    def spread(width: int) -> torch.Tensor:  # the mass spread about evenly over `width` tokens
        row = torch.randn(vocab) * 0.01
        row[width:] -= 30
        return row

    peaked = torch.randn(vocab) * 0.5
    peaked[:5] += 12
    rows = [peaked, spread(100), spread(1500), peaked.roll(7), spread(2000), spread(300)]
    tiers = [0, 1, 2, 0, 2, 1]  # which tier holds each row's nucleus
    logits = torch.stack(rows)
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=i) for i in range(len(rows))]
    tokens = sample_next_tokens(logits, params, [p.make_rng() for p in params]).tolist()
    bounds = [0, *sampling.NUCLEUS_CANDIDATES, vocab]
    for row, tier in enumerate(tiers):
        probs = torch.softmax(logits[row].double(), dim=-1).tolist()
        assert_clear_of_the_boundary(probs, top_p)
        kept = sorted(nucleus(probs, top_p).items(), key=lambda item: -item[1])
        assert bounds[tier] < len(kept) <= bounds[tier + 1], row
        target = random.Random(row).random() * sum(p for _, p in kept)
        running, expected = 0.0, kept[-1][0]
        for token, p in kept:
            running += p
            if running > target:
                expected = token
                break
        assert tokens[row] == expected, row


def test_non_finite_logits_are_an_error_not_a_token():
    logits = torch.full((2, 10), float("nan"))
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=0)] * 2
    with pytest.raises(SamplingError, match="non-finite"):
        sample_next_tokens(logits, params, [p.make_rng() for p in params])


def test_stop_helpers():
    assert find_stop("hello\n<extra_id_1>", ["<extra_id_1>", "lo"]) == 3
    assert find_stop("hello", ["x"]) == -1
    # new_from: only stops that reach the new text, including one that straddles its start.
    assert find_stop("ab<stop>cd<stop>", ["<stop>"], new_from=10) == 10
    assert find_stop("ab<stop>cd<stop>", ["<stop>"], new_from=14) == 10
    assert find_stop("ab<stop>cd", ["<stop>"], new_from=9) == -1
    assert streamable_length("hello <extra", ["<extra_id_1>"]) == len("hello ")
    assert streamable_length("hello", ["<extra_id_1>"]) == 5


def test_streamable_length_holds_back_the_longest_tail_that_starts_a_stop():
    """Against an oracle that tries every stop's every prefix, over texts made of the stops' own
    characters (so that tails match often), repeated and overlapping stops included."""
    import random

    def oracle(text, stops):
        held = [k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])]
        return len(text) - max(held, default=0)

    rng = random.Random(0)
    for stop_set in (["<|end|>", "\nUser:"], ["aba", "abab", "b"], ["xx", "xyx", "x"], ["<extra_id_1>"], ["\n\n"]):
        alphabet = "".join(sorted(set("".join(stop_set)))) + "q"
        prefixes = stop_prefixes(stop_set)
        for _ in range(400):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
            assert streamable_length(text, stop_set, prefixes) == oracle(text, stop_set), (text, stop_set)
            assert streamable_length(text, stop_set) == oracle(text, stop_set)


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6])
def test_tiny_temperature_is_greedy_not_an_overflow(temperature):
    import random

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    params = SamplingParams(temperature=temperature)
    assert params.temperature == 0.0
    tokens = sample_next_tokens(logits, [params] * 3, [random.Random(i) for i in range(3)])
    assert tokens.tolist() == logits.argmax(-1).tolist()
    # Params built another way (mutated after validation) still never divide by a tiny number.
    params.temperature = temperature
    tokens = sample_next_tokens(logits, [params] * 3, [random.Random(i) for i in range(3)])
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_stop_strings_have_a_length_limit():
    from steer.runtime.sampling import MAX_STOP_LENGTH

    SamplingParams(stop=["x" * MAX_STOP_LENGTH])
    with pytest.raises(SamplingError, match=f"at most {MAX_STOP_LENGTH} characters") as info:
        SamplingParams(stop=["x" * 100_000])
    assert info.value.field == "stop"


def test_logit_bias_bans_and_forces_tokens():
    import random

    torch.manual_seed(1)
    logits = torch.randn(2, 20)
    top = logits.argmax(-1).tolist()
    banned = SamplingParams(temperature=0, logit_bias={top[0]: -100})
    forced = SamplingParams(temperature=1.0, logit_bias={7: 100})
    tokens = sample_next_tokens(logits, [banned, forced], [random.Random(0), random.Random(0)])
    assert tokens[0] != top[0] and tokens[1] == 7
    # Ids past the model's vocabulary (the tokenizer may list more) are ignored, not an error.
    assert sample_next_tokens(logits[:1], [SamplingParams(temperature=0, logit_bias={10**6: 5})],
                              [random.Random(0)]).tolist() == [top[0]]


def test_presence_and_frequency_penalties_follow_openai_and_batch_like_single_rows():
    from steer.runtime.sampling import adjust_logits

    logits = torch.zeros(3, 6)
    generated = [[1, 1, 2], [1, 1, 2], []]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(), 
              SamplingParams(presence_penalty=2.0)]
    out = adjust_logits(logits, params, generated)
    # OpenAI: logit - count * frequency - (count > 0) * presence, over the reply's own tokens.
    assert out[0].tolist() == [0.0, -1.0, -0.75, 0.0, 0.0, 0.0]
    assert out[1].tolist() == [0.0] * 6 and out[2].tolist() == [0.0] * 6
    for i in range(3):
        assert torch.equal(adjust_logits(logits[i:i + 1], params[i:i + 1], generated[i:i + 1])[0], out[i])
    assert logits.abs().sum() == 0  # the caller's logits are untouched


def test_penalties_stop_a_greedy_row_repeating_itself():
    import random

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    plain, penalised = [], []
    for params, out in [(SamplingParams(temperature=0), plain),
                        (SamplingParams(temperature=0, frequency_penalty=2.0, presence_penalty=2.0), penalised)]:
        for _ in range(4):
            out.append(int(sample_next_tokens(logits, [params], [random.Random(0)], [out])[0]))
    assert plain == [0, 0, 0, 0]
    assert len(set(penalised)) == 4


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {5: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
])
def test_penalty_and_bias_ranges(kwargs, field):
    with pytest.raises(SamplingError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field


def test_reply_state_ends_at_the_earliest_stop_and_holds_back_a_possible_one(gpt2_tokenizer):
    """steer.runtime.stopping: the one end-of-reply rule, token by token, against a full search."""
    from steer.runtime.detokenize import TokenDecoder
    from steer.runtime.stopping import ReplyState

    decoder = TokenDecoder.for_tokenizer(gpt2_tokenizer)
    text = "Aye, the blade is done.\n<extra_id_1>User\nmore"
    ids = gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]
    for stops, expected, reason in [
        (["\n<extra_id_1>", "<extra_id_1>"], "Aye, the blade is done.", "stop"),
        (["<extra_id_1>", "done"], "Aye, the blade is ", "stop"),
        (["nothing"], text, "length"),
    ]:
        reply = ReplyState(decoder.detokenizer(), stops, max_tokens=len(ids), eos_ids=frozenset())
        streamed = ""
        for i, token in enumerate(ids):
            ended = reply.add(token)
            streamed += reply.delta()
            assert expected.startswith(streamed)  # nothing past the cut ever goes out
            if ended:
                break
        assert (reply.text, reply.finish_reason, streamed) == (expected, reason, expected)
    eos = ReplyState(decoder.detokenizer(), [], max_tokens=10, eos_ids=frozenset({ids[2]}))
    assert [eos.add(t) for t in ids[:3]] == [False, False, True]
    assert eos.finish_reason == "stop" and eos.completion_tokens == 3 and eos.text == gpt2_tokenizer.decode(ids[:2])
