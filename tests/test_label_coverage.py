"""Label histograms (relabel, sft) and warnings for attribute values a policy never saw in training."""

from __future__ import annotations

import json
import logging

from steer.core.attributes import get_schema
from steer.core.conversation import Conversation, Message
from steer.data import format_histogram, label_histogram, trained_values, unseen_request_warnings, unseen_values


def conv(**labels) -> Conversation:
    return Conversation([Message("user", "hi"), Message("assistant", "hello", labels=labels)])


def test_histogram_counts_values_and_names_the_unseen():
    schema = get_schema("helpsteer")
    convs = [conv(helpfulness=3, verbosity=1), conv(helpfulness=3), conv(helpfulness=2)]
    hist = label_histogram(convs, schema)
    assert hist["helpfulness"] == {2: 1, 3: 2} and hist["verbosity"] == {1: 1} and hist["coherence"] == {}
    assert unseen_values(hist, schema)["helpfulness"] == [0, 1, 4]
    assert "helpfulness  0:- 1:- 2:1 3:2 4:-" in format_histogram(hist, schema)
    seen = trained_values(hist)
    assert seen["helpfulness"] == [2, 3]
    # Saved in steer_config.json, the histogram's keys come back as text; the warning still works.
    seen = json.loads(json.dumps(seen))
    (warning,) = unseen_request_warnings({"helpfulness": 4, "verbosity": 1}, seen)
    assert "'helpfulness'" in warning and "value 4" in warning and "seen: 2, 3" in warning
    assert unseen_request_warnings({"helpfulness": 4}, None) == []  # a policy from before the record


def test_sft_prints_histogram_warns_and_records_trained_values(tmp_path, caplog):
    from steer.training.sft import report_label_histogram

    schema = get_schema("helpsteer")
    with caplog.at_level(logging.INFO, logger="steer.training.sft"):
        hist = report_label_histogram([conv(helpfulness=3, coherence=4)], schema)
    text = caplog.text
    assert "training labels" in text and "helpfulness  0:- 1:- 2:- 3:1 4:-" in text
    assert "values that never occur in the training data" in text
    assert "attribute 'helpfulness': value(s) 0, 1, 2, 4\n" in text and "attribute 'coherence': value(s) 0, 1, 2, 3" in text
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1  # said once, not per attribute
    assert trained_values(hist)["coherence"] == [4]


def test_generate_and_serve_warn_about_values_never_trained(build_tiny_policy, hello, make_client, sse_events, wait_ready, tmp_path):
    from steer.runtime.generator import SteerGenerator

    policy = build_tiny_policy(tmp_path / "policy")
    config_path = policy / "steer_config.json"
    config = json.loads(config_path.read_text())
    config["trained_values"] = {"helpfulness": [2, 3], "humor": [0, 1, 2], "creativity": [0, 1, 2, 3, 4]}
    config_path.write_text(json.dumps(config))

    generator = SteerGenerator.load(policy, device="cpu")
    result = generator.generate(hello, attributes={"humor": 4}, max_new_tokens=3, seed=0)
    assert len(result.warnings) == 1 and "'humor'" in result.warnings[0] and result.to_dict()["warnings"]
    assert generator.generate(hello, attributes={"humor": 1}, max_new_tokens=3, seed=0).warnings == []
    # helpfulness' default (3) was seen, creativity's (1) too; a default is never warned about anyway:
    config["trained_values"]["creativity"] = [4]
    config_path.write_text(json.dumps(config))
    assert SteerGenerator.load(policy, device="cpu").generate(hello, max_new_tokens=3, seed=0).warnings == []

    with make_client(policy, max_tokens_limit=8) as client:
        wait_ready(client)
        body = {"messages": hello, "attributes": {"humor": 4}, "max_tokens": 3}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and "'humor'" in r.json()["warnings"][0]
        ok = client.post("/v1/chat/completions", json={**body, "attributes": {"humor": 1}}).json()
        assert ok.get("warnings") is None  # creativity's default (1) is unseen, but it was not asked for
        events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}).text)
        assert "'humor'" in events[0]["warnings"][0]
