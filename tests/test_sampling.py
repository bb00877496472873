import pytest
import torch

from steer.sampling import (
    SamplingError, SamplingParams, filter_top_p, find_stop, sample_next_tokens, streamable_length,
)


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


def test_seeded_row_is_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [sample_next_tokens(logits[2:3], [p], [p.make_generator()]) for _ in range(1)][0]
    others = [SamplingParams(seed=s) for s in (1, 2, 3)]
    batch_params = [others[0], others[1], p, others[2]]
    batch = sample_next_tokens(logits, batch_params, [q.make_generator() for q in batch_params])
    assert batch[2] == alone[0]
    greedy = SamplingParams(temperature=0)
    assert sample_next_tokens(logits, [greedy] * 4, [greedy.make_generator()] * 4).tolist() == logits.argmax(-1).tolist()


def test_stop_helpers():
    assert find_stop("hello\n<extra_id_1>", ["<extra_id_1>", "lo"]) == 3
    assert find_stop("hello", ["x"]) == -1
    assert streamable_length("hello <extra", ["<extra_id_1>"]) == len("hello ")
    assert streamable_length("hello", ["<extra_id_1>"]) == 5
