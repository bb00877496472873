import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steer.data import DataError, grouped_split, load_conversations, parse_hh_dialogue


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def oasst_msg(mid, parent, role, text, labels=None, deleted=False, tree="t1"):
    lab = {"name": list(labels), "value": list(labels.values()), "count": [3] * len(labels)} if labels else None
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "deleted": deleted,
            "message_tree_id": tree, "labels": lab}


def test_oasst_tree_paths_labels_and_deletions(tmp_path):
    rows = [
        oasst_msg("p1", None, "prompter", "Tell a joke"),
        oasst_msg("a1", "p1", "assistant", "Knock knock", {"humor": 0.9, "quality": 0.5, "spam": 0.0}),
        oasst_msg("a2", "p1", "assistant", "No.", {"humor": 0.0}),
        oasst_msg("a3", "p1", "assistant", "deleted reply", {"humor": 1.0}, deleted=True),
        oasst_msg("p2", "a1", "prompter", "Who's there?"),
        oasst_msg("a4", "p2", "assistant", "Lettuce", {"humor": 0.6}),
        oasst_msg("a5", "a3", "prompter", "under a deleted message"),
        oasst_msg("p3", "a2", "prompter", "unanswered"),
    ]
    convs, report = load_conversations(write_jsonl(tmp_path / "m.jsonl", rows), "oasst")
    assert report.bad == []
    by_id = {c.id: c for c in convs}
    assert set(by_id) == {"a4", "a2"}  # a1 lives inside a4's path; a3 and its subtree are gone
    assert [m.content for m in by_id["a4"].messages] == ["Tell a joke", "Knock knock", "Who's there?", "Lettuce"]
    assert [m.role for m in by_id["a2"].messages] == ["user", "assistant"]  # the unanswered prompt is trimmed
    a1 = by_id["a4"].messages[1]
    assert a1.labels == {"humor": 4, "quality": 2}  # round(0.9*4)=4, round(0.5*4)=2; 'spam' not in schema
    assert a1.scores == pytest.approx({"humor": 3.6, "quality": 2.0})
    assert "helpfulness" not in a1.labels  # missing stays missing
    assert {c.group for c in convs} == {"t1"}


def test_oasst_real_file(shared_path):
    convs, report = load_conversations(shared_path("data", "oasst1-en", "messages.jsonl"), "oasst")
    assistant_ids = {m.id for c in convs for m in c.messages if m.role == "assistant"}
    assert len(assistant_ids) > 880 and len({c.group for c in convs}) > 130
    labelled = [m for c in convs for m in c.messages if m.labels]
    assert all(0 <= v <= 4 for m in labelled for v in m.labels.values())
    assert any("helpfulness" not in m.labels for m in labelled)  # the real data has gaps; kept as gaps


def test_helpsteer_real_file_and_multiturn(shared_path, tmp_path):
    convs, _ = load_conversations(shared_path("data", "helpsteer2", "sample.jsonl"), "helpsteer")
    assert len(convs) == 100
    assert set(convs[0].messages[-1].labels) == {"helpfulness", "correctness", "coherence", "complexity", "verbosity"}
    assert convs[0].group == convs[1].group  # two responses to one prompt share a group
    row = {"prompt": "Hi<extra_id_1>Assistant\nHello!<extra_id_1>User\nTell me more", "response": "Sure.",
           "helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 1, "verbosity": 1}
    convs, _ = load_conversations(write_jsonl(tmp_path / "h.jsonl", [row]), "helpsteer")
    assert [(m.role, m.content) for m in convs[0].messages] == [
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "Tell me more"), ("assistant", "Sure.")
    ]


def test_hh_parsing_and_real_file(shared_path):
    msgs = parse_hh_dialogue("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao")
    assert [(m.role, m.content) for m in msgs] == [
        ("user", "hi there"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")
    ]
    convs, report = load_conversations(shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz"), "hh")
    assert len(convs) > 4000 and report.rows == 2312
    assert {c.meta["preference"] for c in convs} == {"chosen", "rejected"}
    assert all(not m.labels for c in convs for m in c.messages)


def test_malformed_rows_reported_with_line_numbers(tmp_path, caplog):
    good = {"prompt": "a", "response": "b", "helpfulness": 2}
    path = write_jsonl(tmp_path / "h.jsonl", [good, "{not json", {"prompt": "a"}, {**good, "helpfulness": 7}, good])
    convs, report = load_conversations(path, "helpsteer")
    assert len(convs) == 2
    assert [b.line for b in report.bad] == [2, 3, 4]
    assert "invalid JSON" in report.bad[0].reason and "outside its range" in report.bad[2].reason
    assert "skipped 3 malformed row(s)" in caplog.text
    with pytest.raises(DataError, match=r"h.jsonl:2: invalid JSON"):
        load_conversations(path, "helpsteer", strict=True)


def test_table_formats_with_column_mapping(tmp_path):
    rows = [{"instruction": "Sharpen my axe", "output": "Done.", "funny": 3, "sys": "You are Brom."},
            {"instruction": "Hello", "output": "Hi.", "funny": "", "sys": ""}]
    mapping = ["prompt=instruction", "response=output", "humor=funny", "system=sys"]
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist([{**r, "funny": r["funny"] or None} for r in rows]), tmp_path / "t.parquet")
    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write(jsonl.read_text())
    for name in ("t.jsonl", "t.csv", "t.parquet", "t.jsonl.gz"):
        convs, report = load_conversations(tmp_path / name, "table", schema="oasst", columns=mapping)
        assert report.bad == [], name
        assert [m.role for m in convs[0].messages] == ["system", "user", "assistant"]
        assert convs[0].messages[-1].labels == {"humor": 3}
        assert convs[1].messages[-1].labels == {}  # empty cell = missing label
        assert [m.role for m in convs[1].messages] == ["user", "assistant"]


def test_table_messages_column_and_bad_mapping(tmp_path):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "humor": 2}
    convs, _ = load_conversations(write_jsonl(tmp_path / "m.jsonl", [row]), "jsonl", schema="oasst")
    assert convs[0].messages[-1].labels == {"humor": 2}
    with pytest.raises(DataError, match="unknown field"):
        load_conversations(tmp_path / "m.jsonl", "jsonl", schema="oasst", columns=["banana=x"])
    with pytest.raises(DataError, match="must look like field=column"):
        load_conversations(tmp_path / "m.jsonl", "jsonl", columns=["prompt"])


def test_native_round_trip(shared_path, tmp_path):
    convs, _ = load_conversations(shared_path("data", "helpsteer2", "sample.jsonl"), "helpsteer")
    path = write_jsonl(tmp_path / "n.jsonl", [c.to_dict() for c in convs])
    back, report = load_conversations(path, "steer", schema="helpsteer")
    assert report.bad == [] and [c.to_dict() for c in back] == [c.to_dict() for c in convs]


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(tmp_path / "nope.jsonl", "oasst")
    with pytest.raises(DataError, match="unknown format"):
        load_conversations(tmp_path / "x.jsonl", "banana")


def test_grouped_split_never_shares_a_group(shared_path):
    convs, _ = load_conversations(shared_path("data", "oasst1-en", "messages.jsonl"), "oasst")
    train, evaluation = grouped_split(convs, 0.2, seed=1)
    assert len(train) + len(evaluation) == len(convs)
    assert not {c.group for c in train} & {c.group for c in evaluation}
    assert 0.1 < len(evaluation) / len(convs) < 0.3
    again, _ = grouped_split(convs, 0.2, seed=1)
    assert [c.id for c in again] == [c.id for c in train]


# ----------------------------------------------------------------------------------------------
# Issue 17: each message names the real cause and the flag that fixes it.

def _steer_row(i, labels):
    return {"id": f"c{i}", "messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "hello", "labels": labels}]}


def test_schema_mismatch_is_named_with_the_flag(tmp_path):
    from steer.training.sft import SftConfig, SftError, load_sft_conversations

    path = write_jsonl(tmp_path / "o.jsonl", [_steer_row(i, {"quality": 3, "humor": 1}) for i in range(4)])
    convs, report = load_conversations(path, "steer", schema="helpsteer")
    assert convs == [] and {b.kind for b in report.bad} == {"schema"}
    summary = report.summary()
    assert "skipped 4 row(s) with labels the attribute schema does not have" in summary
    assert "unknown attribute 'quality'" in summary and "--schema" in summary and "malformed" not in summary
    with pytest.raises(SftError, match="no usable conversations.*labels the attribute schema does not have.*--schema"):
        load_sft_conversations(SftConfig(base_model="x", data=str(path), output_dir="y", schema="helpsteer"))


def test_hh_rows_read_as_a_table_suggest_format_hh(shared_path, tmp_path):
    data = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    convs, report = load_conversations(data, "jsonl", limit=5)
    assert convs == []
    assert "another format" in report.summary() and "pass --format hh" in report.summary()
    oasst = write_jsonl(tmp_path / "m.jsonl", [{"message_id": "a", "parent_id": None, "role": "prompter", "text": "x"}])
    assert "pass --format oasst" in load_conversations(oasst, "jsonl")[1].summary()


def test_malformed_counts_say_conversations_and_rows(tmp_path):
    broken = {"chosen": "\n\nAssistant: no question", "rejected": "\n\nAssistant: none either"}
    ok = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    path = write_jsonl(tmp_path / "hh.jsonl", [ok, broken, ok])
    convs, report = load_conversations(path, "hh")
    assert len(convs) == 4
    assert report.summary().startswith("skipped 2 malformed conversation(s) from 1 input row(s): line 2")
    helpsteer = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_conversations(helpsteer, "helpsteer")[1].summary().startswith("skipped 2 malformed row(s): line 1")


def test_sft_reports_truncation_and_drops_once(llama_tokenizer, caplog):
    import logging

    from steer.core.attributes import get_schema
    from steer.core.conversation import Conversation, Message
    from steer.core.template import PromptTemplate
    from steer.training.sft import TokenizeStats, tokenize_conversations

    schema = get_schema("helpsteer")
    template = PromptTemplate(schema)
    short = Conversation([Message("user", "hi"), Message("assistant", "hello", labels={"helpfulness": 3})])
    long_prompt = Conversation([Message("user", "word " * 200), Message("assistant", "ok", labels={"helpfulness": 3})])
    long_reply = Conversation([Message("user", "hi"), Message("assistant", "word " * 200, labels={"helpfulness": 3})])
    stats = TokenizeStats()
    with caplog.at_level(logging.WARNING, logger="steer.training.sft"):
        train = tokenize_conversations([short, long_prompt, long_reply], template, llama_tokenizer, 128, stats)
        held = tokenize_conversations([long_prompt], template, llama_tokenizer, 128, stats)
        assert caplog.records == []  # nothing said per split ...
        stats.log(128)
    assert len(train) == 2 and held == []
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "3 of 4 conversations were longer than --max-length 128 tokens and were truncated",
        "2 of 4 conversations were dropped: no reply tokens left to train on within --max-length 128 "
        "(raise it to keep them)",
    ]


def test_unsupported_model_formats_say_what_the_file_is(shared_path, tmp_path, capsys):
    from steer.cli.main import main as cli_main
    from steer.models.modeling import unsupported_model_message

    gguf_dir = shared_path("models", "smollm2-135m-instruct")
    gguf = gguf_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert unsupported_model_message(gguf) is None  # GGUF files load (tests/test_gguf.py)
    assert f"pass the .gguf file itself (for example {gguf})" in unsupported_model_message(gguf_dir)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text("{}")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"")
    assert "only pickled PyTorch weights" in unsupported_model_message(tmp_path / "bin")
    assert unsupported_model_message(shared_path("models", "stories260K")) is None
    data = write_jsonl(tmp_path / "d.jsonl", [_steer_row(0, {"humor": 1})])
    rc = cli_main(["sft", "--base-model", str(gguf_dir), "--data", str(data), "--output", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("steer sft: error") and "pass the .gguf file itself" in err
