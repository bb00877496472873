import json
import os
from types import SimpleNamespace

import pytest
import torch

from steer.core.attributes import AttributeValueError, get_schema
from steer.runtime.generator import GenerationError, GenerationRequest, SteerGenerator
from steer.runtime.model_runner import decode_step, left_pad, prefill
from steer.runtime.sampling import SamplingError
from steer.core.template import PromptTemplate


@pytest.fixture(scope="module")
def policy_dir(build_random_policy, tmp_path_factory):
    return build_random_policy(tmp_path_factory.mktemp("policy") / "p", schema=get_schema("oasst"))


@pytest.fixture(scope="module")
def generator(policy_dir):
    return SteerGenerator.load(policy_dir, device="cpu")


USER = [{"role": "user", "content": "Tell me about item 7, please."}]
LONGER = [
    {"role": "system", "content": "You are a shopkeeper in a small town far away."},
    {"role": "user", "content": "Tell me about item 12, please. And also item 13 if you have time."},
]


def test_same_seed_same_text_and_seeds_matter(generator):
    a = generator.generate(USER, {"humor": 3}, max_new_tokens=20, seed=5)
    b = generator.generate(USER, {"humor": 3}, max_new_tokens=20, seed=5)
    assert a == b
    others = {generator.generate(USER, {"humor": 3}, max_new_tokens=20, seed=s).text for s in (6, 7, 8)}
    assert others - {a.text}, "different seeds never changed the text"
    assert a.completion_tokens == 20 and a.finish_reason == "length"
    assert a.prompt_tokens == len(generator.template.tokenize(USER, generator.tokenizer, "inference",
                                                              {"humor": 3}).input_ids)


def test_batch_rows_match_single_requests(generator):
    requests = [
        GenerationRequest(USER, {"humor": 4}, max_new_tokens=12, temperature=0.9, seed=1),
        GenerationRequest(LONGER, {"creativity": 1, "quality": 2}, max_new_tokens=20, temperature=0.7, seed=2),
        GenerationRequest(USER, {"humor": 0}, max_new_tokens=16, temperature=0.0, seed=None),
        GenerationRequest(LONGER, None, max_new_tokens=8, temperature=1.2, top_p=0.5, seed=3),
    ]
    batched = generator.generate_batch(requests)
    for req, got in zip(requests, batched):
        alone = generator.generate(req.messages, req.attributes, req.max_new_tokens, req.temperature, req.top_p,
                                   req.seed, req.stop)
        assert got == alone
    assert [r.completion_tokens for r in batched] == [12, 20, 16, 8]


def test_alike_prompts_copy_their_shared_start_from_one_another_and_still_match_single_requests(generator):
    from steer.runtime.scheduler import Scheduler

    requests = [GenerationRequest(USER, {"humor": 4}, max_new_tokens=10, temperature=0.8, seed=1),
                GenerationRequest(USER, {"humor": 0}, max_new_tokens=10, temperature=0.8, seed=2),
                GenerationRequest(USER, {"humor": 4}, max_new_tokens=10, temperature=0.8, seed=3),
                GenerationRequest(LONGER, None, max_new_tokens=10, temperature=0.0)]
    prepared = [generator.prepare(r) for r in requests]
    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=4, max_queue=0,
                       eos_token_ids=generator.eos_ids)
    rows = engine.run([p.row() for p in prepared])
    # The first row is prefilled; the others copy what they share with it (the third all but its
    # last token; the fourth, whose system turn differs, too little to copy) and feed only the rest.
    first, lengths = prepared[0].prompt_ids, [len(p.prompt_ids) for p in prepared]
    shared = [len(os.path.commonprefix([first, p.prompt_ids[:-1]])) for p in prepared[1:]]
    assert shared[0] > 8 and shared[1] == lengths[2] - 1 and shared[2] < 8
    assert engine.batch.tokens_copied == shared[0] + shared[1]
    assert engine.batch.tokens_prefilled + engine.batch.tokens_copied == sum(lengths)
    for request, row in zip(requests, rows):
        alone = generator.generate(request.messages, request.attributes, request.max_new_tokens, request.temperature,
                                   seed=request.seed)
        assert row.reply.text == alone.text


def test_a_waiting_request_takes_the_slot_of_the_first_to_end_and_still_matches_single_requests(generator,
                                                                                                  monkeypatch):
    import steer.runtime.generator as generator_module

    engines = []

    class RecordingScheduler(generator_module.Scheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(generator_module, "Scheduler", RecordingScheduler)
    lengths = [2, 12, 3, 10, 4, 6]
    requests = [GenerationRequest(USER if i % 2 else LONGER, {"humor": i % 5}, max_new_tokens=n, temperature=0.8,
                                  seed=i, ignore_eos=True) for i, n in enumerate(lengths)]
    ended = []
    results = generator.generate_prepared([generator.prepare(r) for r in requests], max_batch_size=2,
                                          on_result=lambda i, result: ended.append((i, result)))
    assert engines[-1].stats().max_batch_seen == 2
    # Row 0 (2 tokens) ends first and row 2 takes its slot and ends (3 tokens) while row 1 (12) runs.
    assert [i for i, _ in ended][:2] == [0, 2] and sorted(i for i, _ in ended) == list(range(6))
    assert all(results[i] == result for i, result in ended)
    assert [r.completion_tokens for r in results] == lengths
    for request, got in zip(requests, results):
        alone = generator.generate(request.messages, request.attributes, request.max_new_tokens, request.temperature,
                                   seed=request.seed, ignore_eos=True)
        assert got == alone


def _alone(generator, row):
    """``row``'s reply from a scheduler of its own (nothing cached to copy from)."""
    from steer.runtime.scheduler import Row, Scheduler

    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=1, max_queue=0,
                       eos_token_ids=generator.eos_ids)
    [done] = engine.run([Row(prompt_ids=list(row.prompt_ids), params=row.params, stops=row.stops)])
    assert engine.batch.tokens_copied == 0
    return done.reply.text


def test_a_joining_prompt_copies_what_an_ended_request_left_in_its_slot(generator):
    """A next turn that starts with an ended request's prompt and reply takes that request's free
    slot and copies its start from what the slot's cache still holds (in place), instead of feeding
    it; its reply is the one it gets alone."""
    from steer.runtime.scheduler import Scheduler

    params = dict(temperature=0.8, ignore_eos=True)
    first = generator.prepare(GenerationRequest(LONGER, {"humor": 2}, max_new_tokens=3, seed=1, **params)).row()
    other = generator.prepare(GenerationRequest(USER, {"humor": 1}, max_new_tokens=14, seed=2, **params)).row()
    # The next turn: the first request's prompt, then tokens of its own (known before it runs).
    turn = generator.prepare(GenerationRequest(LONGER, {"humor": 2}, max_new_tokens=6, seed=3, **params)).row()
    turn.prompt_ids = list(first.prompt_ids) + [5, 6, 7, 8, 9]
    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=2, max_queue=1,
                       eos_token_ids=generator.eos_ids)
    engine.run([first, other, turn])
    shared_with_other = len(os.path.commonprefix([other.prompt_ids, turn.prompt_ids]))
    held = first.prompt_ids + first.generated[:-1]
    expected = len(os.path.commonprefix([held, turn.prompt_ids[:-1]]))
    assert shared_with_other < 8 <= len(first.prompt_ids) <= expected
    assert engine.batch.tokens_copied == expected
    for row in (first, other, turn):
        assert row.reply.text == _alone(generator, row)


def test_a_prompt_longer_than_the_batch_that_shares_nothing_is_prefilled_apart_and_appended(generator):
    from steer.runtime.scheduler import Row, Scheduler
    from steer.runtime.sampling import SamplingParams

    def row(ids, tokens, seed):
        return Row(prompt_ids=ids, params=SamplingParams(max_new_tokens=tokens, temperature=0.9, seed=seed,
                                                         ignore_eos=True), stops=[])

    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=2, max_queue=1,
                       eos_token_ids=generator.eos_ids)
    prefilled = []
    prefill = engine.batch._prefill
    engine.batch._prefill = lambda sequences: (prefilled.append(len(sequences)), prefill(sequences))[1]
    rows = [row([5, 6, 7, 8, 9, 10], 12, 1), row([11, 12, 13, 14, 15, 16], 2, 2), row(list(range(20, 60)), 3, 3)]
    engine.run(rows)
    assert prefilled == [2, 1] and engine.batch.tokens_copied == 0
    assert [r.reply.text for r in rows] == [_alone(generator, r) for r in rows]


def test_requests_after_the_batch_ended_copy_the_prompts_it_held(generator):
    """When the last row ends the batch's cache is kept: the next requests with those prompts feed
    only their last token; unrelated ones are prefilled as usual. Replies match their runs alone."""
    from steer.runtime.scheduler import Scheduler

    def rows(seed):
        return [generator.prepare(GenerationRequest(USER, {"humor": 4}, max_new_tokens=5, seed=seed,
                                                    temperature=0.9, ignore_eos=True)).row(),
                generator.prepare(GenerationRequest(LONGER, None, max_new_tokens=7, seed=seed + 1,
                                                    temperature=0.9, ignore_eos=True)).row()]

    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=2, max_queue=0,
                       eos_token_ids=generator.eos_ids)
    ended = engine.run(rows(10))
    assert not engine.batch.slots
    copied, prefilled = engine.batch.tokens_copied, engine.batch.tokens_prefilled
    again = engine.run(rows(20))
    assert engine.batch.tokens_copied - copied == sum(len(r.prompt_ids) - 1 for r in again)
    assert engine.batch.tokens_prefilled - prefilled == 2
    for row in ended + again:
        assert row.reply.text == _alone(generator, row)
    # A prompt that shares too little with what is held: prefilled whole.
    unrelated = generator.prepare(GenerationRequest([{"role": "user", "content": "Something else."}], None,
                                                    max_new_tokens=4, seed=3, temperature=0.9)).row()
    unrelated.prompt_ids = [9, 8, 7] + unrelated.prompt_ids
    copied, prefilled = engine.batch.tokens_copied, engine.batch.tokens_prefilled
    [done] = engine.run([unrelated])
    assert engine.batch.tokens_copied == copied
    assert engine.batch.tokens_prefilled - prefilled == len(unrelated.prompt_ids)
    assert done.reply.text == _alone(generator, done)
    # Without the prompt cache nothing an ended request held is kept.
    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=2, max_queue=0,
                       eos_token_ids=generator.eos_ids, prompt_cache=False)
    engine.run(rows(10))
    again = engine.run(rows(20))
    assert engine.batch.tokens_copied == 0
    assert [r.reply.text for r in again] == [_alone(generator, r) for r in again]


def test_requests_arriving_one_by_one_after_the_batch_ended_each_copy_their_own_prompt(generator):
    """Replies that end in the same step are followed by their clients' next requests one by one:
    each still finds what its own ended request left (the parked batch keeps every ended row, not
    only the first newcomer's lender); slots no request takes are compacted away once nothing
    waits; replies match their runs alone."""
    from steer.runtime.scheduler import Scheduler

    third = [{"role": "user", "content": "A third question, about the weather at sea."}]

    def rows(seed, tokens=4):
        return [generator.prepare(GenerationRequest(messages, {"humor": i}, max_new_tokens=tokens, seed=seed + i,
                                                    temperature=0.9, ignore_eos=True)).row()
                for i, messages in enumerate([USER, LONGER, third])]

    engine = Scheduler(generator.model, generator.tokenizer, max_batch_size=3, max_queue=0,
                       eos_token_ids=generator.eos_ids)
    ended = engine.run(rows(10))
    assert not engine.batch.slots
    copied, prefilled = engine.batch.tokens_copied, engine.batch.tokens_prefilled
    later = rows(20, tokens=12)
    with torch.inference_mode():
        for row in later:  # one request per step
            engine.submit([row])
            engine._step([])
        assert len(engine.batch.slots) == 3
    engine.run([])
    assert engine.batch.tokens_copied - copied == sum(len(r.prompt_ids) - 1 for r in later)
    assert engine.batch.tokens_prefilled - prefilled == len(later)
    for row in ended + later:
        assert row.reply.text == _alone(generator, row)

    # One request after the batch ended: the two rows it does not take are dropped once no
    # request has waited for HOLD_FREE_SLOT_STEPS steps.
    engine.run(rows(30))
    [alone] = rows(40, tokens=12)[:1]
    with torch.inference_mode():
        engine.submit([alone])
        engine._step([])
        assert len(engine.batch.slots) == 3
        for _ in range(engine.batch.HOLD_FREE_SLOT_STEPS + 1):
            engine._step([])
        assert engine.batch.slots == [alone]
    engine.run([])
    assert alone.reply.text == _alone(generator, alone)


def test_batch_file_keeps_input_order_and_a_crash_loses_only_the_replies_in_flight(generator, tmp_path,
                                                                                   monkeypatch):
    from steer.cli.batch import BatchItem, generate_file
    from steer.runtime.scheduler import Scheduler

    lengths = [9, 2, 3, 8, 2, 5]
    items = [BatchItem(f"line-{i}", GenerationRequest(USER, {"humor": i % 5}, max_new_tokens=n, seed=i,
                                                      ignore_eos=True), f"line {i}")
             for i, n in enumerate(lengths)]
    clean = tmp_path / "clean.jsonl"
    generate_file(generator, items, clean, batch_size=2)
    lines = [json.loads(line) for line in clean.read_text().splitlines()]
    assert [line["id"] for line in lines] == [item.id for item in items]  # not the order they ended in
    assert [line["completion_tokens"] for line in lines] == lengths

    steps = 0
    decode_step = Scheduler._decode_step

    def crash_at_step_ten(self):
        nonlocal steps
        steps += 1
        if steps == 10:
            raise KeyboardInterrupt
        decode_step(self)

    monkeypatch.setattr(Scheduler, "_decode_step", crash_at_step_ten)
    crashed = tmp_path / "crashed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_file(generator, items, crashed, batch_size=2)
    # By step 10 line 0 (9 tokens) and the short lines 1 and 2 have ended: they were saved.
    assert [json.loads(line)["id"] for line in crashed.read_text().splitlines()] == ["line-0", "line-1", "line-2"]
    monkeypatch.setattr(Scheduler, "_decode_step", decode_step)
    summary = generate_file(generator, items, crashed, batch_size=2)
    assert summary["skipped"] == 3 and summary["generated"] == 3
    assert crashed.read_text() == clean.read_text()


def test_attributes_are_validated_and_reported_in_full(generator):
    res = generator.generate(USER, {"humour": 4}, max_new_tokens=2, seed=0)
    assert res.attributes == dict(get_schema("oasst").defaults, humor=4)
    with pytest.raises(AttributeValueError) as e:
        generator.generate(USER, {"wit": 2}, max_new_tokens=2)
    assert e.value.field == "wit"
    with pytest.raises(AttributeValueError) as e:
        generator.generate(USER, {"humor": 9}, max_new_tokens=2)
    assert e.value.field == "humor"
    with pytest.raises(SamplingError) as e:
        generator.generate(USER, {}, max_new_tokens=0)
    assert e.value.field == "max_new_tokens"


def test_user_stop_string_cuts_text(generator):
    free = generator.generate(USER, {}, max_new_tokens=30, temperature=0.0)
    stop = free.text[10:13]
    assert stop.strip(), free.text
    cut = generator.generate(USER, {}, max_new_tokens=30, temperature=0.0, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text


def test_prompt_longer_than_context_is_a_clear_error(generator):
    huge = [{"role": "user", "content": "item " * 2000}]
    with pytest.raises(GenerationError) as e:
        generator.generate(huge, {}, max_new_tokens=4)
    assert e.value.field == "messages"


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token sequence, whatever the input: to test stopping exactly."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        # The prefill sees the whole prompt; each decode step adds one column to the mask.
        if input_ids.shape[1] == attention_mask.shape[1]:
            self.prompt_length = attention_mask.shape[1]
        step = attention_mask.shape[1] - self.prompt_length
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], self.vocab), -1e4)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1e4
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_stops_at_template_end_marker_and_strips_it(generator):
    tok = generator.tokenizer
    script = tok("Hello there", add_special_tokens=False)["input_ids"] + tok(
        PromptTemplate(generator.schema).end_marker + "User\nmore", add_special_tokens=False)["input_ids"]
    scripted = SteerGenerator(ScriptedLM(script, len(tok)), tok, generator.schema, generator.template)
    res = scripted.generate(USER, {}, max_new_tokens=50, seed=0)
    assert res.text == "Hello there"
    assert res.finish_reason == "stop"
    n_text = len(tok("Hello there", add_special_tokens=False)["input_ids"])
    assert res.completion_tokens == n_text + len(tok("\n<extra_id_1>", add_special_tokens=False)["input_ids"])
    # EOS also stops, and is not part of the text.
    eos_script = tok("Hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 5, 6]
    res = SteerGenerator(ScriptedLM(eos_script, len(tok)), tok, generator.schema, generator.template).generate(
        USER, {}, max_new_tokens=50, seed=0)
    assert (res.text, res.finish_reason) == ("Hi", "stop")
    # ignore_eos decodes through it to the token budget.
    res = SteerGenerator(ScriptedLM(eos_script, len(tok)), tok, generator.schema, generator.template).generate(
        USER, {}, max_new_tokens=6, seed=0, ignore_eos=True)
    assert (res.completion_tokens, res.finish_reason) == (6, "length")
    assert res.text.startswith("Hi") and res.text != "Hi"


def test_decode_primitives_match_full_forward(generator):
    """prefill + decode_step on a left-padded batch give the logits of an unpadded full forward."""
    model, tok = generator.model, generator.tokenizer
    a = tok("Item 3 is fine", add_special_tokens=False)["input_ids"]
    b = tok("Tell me about item 12, please now", add_special_tokens=False)["input_ids"]
    ids, mask = left_pad([a, b], tok.pad_token_id)
    logits, state = prefill(model, ids, mask)
    nxt = torch.tensor([7, 9])
    step_logits = decode_step(model, nxt, state)
    for row, toks in enumerate((a, b)):
        full = model(input_ids=torch.tensor([toks + [int(nxt[row])]])).logits[0]
        torch.testing.assert_close(logits[row], full[-2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step_logits[row], full[-1], atol=1e-4, rtol=1e-4)


def _cli(argv, capsys):
    from steer.cli.main import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_json_and_seed(policy_dir, capsys):
    argv = ["generate", "--policy", str(policy_dir), "--prompt", "Tell me about item 3", "--system", "Be brief.",
            "--attr", "humour=4", "--attr", "creativity=1", "--seed", "3", "--max-new-tokens", "6", "--json"]
    code, out, _ = _cli(argv, capsys)
    assert code == 0
    first = json.loads(out.strip().splitlines()[-1])
    assert first["attributes"]["humor"] == 4 and first["attributes"]["creativity"] == 1
    assert first["completion_tokens"] == 6
    code, out, _ = _cli(argv, capsys)
    assert json.loads(out.strip().splitlines()[-1]) == first


@pytest.mark.parametrize(
    "attr, named",
    [("humor=9", "humor"), ("wit=2", "wit"), ("humor", "name=value"), ("humor=lots", "humor")],
)
def test_cli_bad_attr_is_one_line_exit_2(policy_dir, capsys, attr, named):
    code, _, err = _cli(["generate", "--policy", str(policy_dir), "--prompt", "hi", "--attr", attr], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in err


def _write_requests(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_batch_file_matches_single_requests_records_seeds_and_resumes(policy_dir, generator, tmp_path, capsys):
    requests = _write_requests(tmp_path / "requests.jsonl", [
        {"id": "smith-1", "prompt": "Tell me about item 3", "attributes": {"humour": 4}, "seed": 3},
        {"id": "smith-2", "messages": LONGER, "attributes": {"creativity": 1}, "seed": 5, "max_new_tokens": 4},
        {"prompt": "Tell me about item 9"},  # no id, no seed
    ])
    out = tmp_path / "lines" / "npc.jsonl"
    argv = ["generate", "--policy", str(policy_dir), "--input", str(requests), "--output", str(out),
            "--system", "Be brief.", "--attr", "creativity=3", "--max-new-tokens", "6", "--batch-size", "2"]
    assert _cli(argv, capsys)[0] == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["smith-1", "smith-2", "line-3"]
    # Flags fill what a line leaves out; the line wins where it speaks.
    assert (lines[0]["attributes"]["humor"], lines[0]["attributes"]["creativity"]) == (4, 3)
    assert lines[1]["attributes"]["creativity"] == 1 and lines[1]["completion_tokens"] <= 4
    # Batched as generate() would do it alone, and the recorded seed of an unseeded line remakes it.
    alone = generator.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about item 3"}],
                               {"humor": 4, "creativity": 3}, max_new_tokens=6, seed=3)
    assert lines[0]["text"] == alone.text and lines[0]["seed"] == 3
    remade = generator.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about item 9"}],
                                {"creativity": 3}, max_new_tokens=6, seed=lines[2]["seed"])
    assert remade.text == lines[2]["text"]

    # A crash mid-write: the second line cut off, the third never written. The rerun keeps the
    # first line as it was, drops the cut-off one and makes the other two.
    kept = out.read_text().splitlines(keepends=True)
    out.write_text(kept[0] + kept[1][:15])
    assert _cli(argv, capsys)[0] == 0
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in again] == ["smith-1", "smith-2", "line-3"]
    assert again[:2] == lines[:2]
    assert _cli(argv, capsys)[0] == 0  # all done: nothing added
    assert len(out.read_text().splitlines()) == 3

    # --seed seeds the lines that give none, each its own: line 3 gets 100 + 2.
    seeded = tmp_path / "seeded.jsonl"
    assert _cli(["generate", "--policy", str(policy_dir), "--input", str(requests), "--output", str(seeded),
                 "--max-new-tokens", "2", "--seed", "100"], capsys)[0] == 0
    assert [json.loads(line)["seed"] for line in seeded.read_text().splitlines()] == [3, 5, 102]


@pytest.mark.parametrize("row, named", [
    ({"prompt": "hi", "attributes": {"humor": 9}}, "humor"),
    ({"prompt": "hi", "colour": "red"}, "colour"),
    ({"attributes": {"humor": 1}}, "prompt"),
    ({"prompt": "hi", "seed": "x"}, "seed"),
    ({"prompt": "hi", "temperature": 7}, "temperature"),
    ({"prompt": "hi", "max_new_tokens": 4.7}, "max_new_tokens"),
    ({"prompt": "hi", "seed": 4.0}, "seed"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "hi", "stop": [1]}, "stop"),
    ({"prompt": "hi", "attributes": ["humor"]}, "attributes"),
    ({"prompt": "hi", "attributes": {"humor": 4.7}}, "humor"),
    ({"messages": "hi"}, "messages"),
    ("not json", "not JSON"),
])
def test_cli_batch_bad_line_is_one_error_naming_line_and_field(policy_dir, tmp_path, capsys, row, named):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "fine"}) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err = _cli(["generate", "--policy", str(policy_dir), "--input", str(requests), "--output", str(out)], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and named in lines[0] and f"{requests} line 2" in lines[0] and "Traceback" not in err
    assert not out.exists()  # checked before anything was generated


class CacheNamedLM(ScriptedLM):
    """A forward with transformers' newer argument name (``cache``, 5.24+) instead of ``past_key_values``."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True):
        self.caches_seen.append(cache)
        out = super().forward(input_ids, attention_mask, position_ids, past_key_values=cache, use_cache=use_cache)
        return SimpleNamespace(logits=out.logits, cache=cache)


def test_the_cache_goes_under_the_name_the_forward_takes(generator):
    tok = generator.tokenizer
    model = CacheNamedLM(tok("Hello there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], len(tok))
    model.caches_seen = []
    res = SteerGenerator(model, tok, generator.schema, generator.template).generate(USER, {}, max_new_tokens=20)
    assert res.text == "Hello there"
    # One cache object, built by prefill and handed back to every decode step.
    assert len(model.caches_seen) == res.completion_tokens and model.caches_seen[0] is not None
    assert all(c is model.caches_seen[0] for c in model.caches_seen)


def test_inference_leaves_cudnn_attention_out_and_restores_it(generator, sdpa_backends):
    """cuDNN attention recompiles for every new shape, i.e. on every decode step: generation runs
    SDPA without it, and the process-wide setting is as it was afterwards."""
    from steer.runtime.mixed_step import mixed_step

    assert torch.backends.cuda.cudnn_sdp_enabled()
    res = generator.generate(USER, {}, max_new_tokens=4, seed=0)
    ids, mask = left_pad([[5, 6, 7], [8, 9]], generator.pad_token_id)
    _, state = prefill(generator.model, ids, mask)
    mixed_step(generator.model, torch.tensor([3, 4]), state, [(1, [10, 11, 12])])
    layers = generator.model.config.num_hidden_layers
    assert len(sdpa_backends) >= layers * (res.completion_tokens + 2)
    assert set(sdpa_backends) == {(False, True, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()
