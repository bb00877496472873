"""APM-guided best-of-n: the choice itself, the Python API and the REST field."""

from __future__ import annotations

import numpy as np
import pytest

from steer.runtime.best_of import (
    BestOfError,
    best_of_target,
    candidate_seed,
    check_weights,
    select_best,
)


# ----------------------------------------------------------------- the choice
def test_select_best_picks_the_closest_candidate_and_breaks_ties_by_index():
    measured = [{"humor": 0.5, "creativity": 3.0}, {"humor": 3.6, "creativity": 0.0},
                {"humor": 4.4, "creativity": 3.0}, {"humor": 3.6, "creativity": 0.0}]
    choice = select_best(measured, {"humor": 4})
    # |3.6-4| = 0.4 = |4.4-4|: candidates 1, 2 and 3 tie; the lowest index wins.
    assert choice.index == 1
    assert choice.distances == pytest.approx((12.25, 0.16, 0.16, 0.16))
    assert choice.measured == measured[1] and choice.candidates == 4
    # Both attributes count: only candidate 2 is close on creativity too.
    assert select_best(measured, {"humor": 4, "creativity": 3}).index == 2
    # Weights shift the choice: creativity alone decides when humor weighs nothing.
    assert select_best(measured, {"humor": 4, "creativity": 0}, {"humor": 0.0}).index == 1
    assert select_best(measured, {"humor": 0, "creativity": 3}, {"creativity": 0.0}).index == 0


def test_target_uses_the_explicit_attributes_the_apm_measures():
    applied = {"helpfulness": 3, "humor": 4, "creativity": 1}
    assert best_of_target(applied, ["humor"], ["humor", "creativity"]) == {"humor": 4}
    assert best_of_target(applied, [], ["humor", "creativity"]) == {"humor": 4, "creativity": 1}
    with pytest.raises(BestOfError) as e:
        best_of_target(applied, ["helpfulness"], ["humor"])
    assert e.value.field == "best_of"
    with pytest.raises(BestOfError) as e:
        check_weights({"humor": -1}, {"humor": 4})
    assert e.value.field == "best_of_weights"
    with pytest.raises(BestOfError):
        check_weights({"quality": 1}, {"humor": 4})
    assert candidate_seed(7, 3) == 10 and candidate_seed(None, 3) is None


# ----------------------------------------------------------- the Python API
class LengthApm:
    """A fake judge: humor is the reply's length in characters / 10, creativity its word count / 5."""

    def __init__(self, schema):
        self.schema, self.calls = schema, 0

    def predict(self, items, **_):
        self.calls += 1
        out = np.zeros((len(items), len(self.schema)))
        for i, conv in enumerate(items):
            text = conv[-1]["content"]
            out[i] = [2.0, len(text) / 10, len(text.split()) / 5]
        return out


@pytest.fixture(scope="module")
def generator(build_tiny_policy, tmp_path_factory):
    from steer.runtime.generator import SteerGenerator

    policy = build_tiny_policy(tmp_path_factory.mktemp("bo") / "policy")
    return SteerGenerator.load(policy, device="cpu", apm=None)


def test_generate_best_of_returns_the_candidate_closest_to_the_request(demo_schema, hello, generator):
    from steer.runtime.generator import GenerationError, GenerationRequest

    with pytest.raises(GenerationError) as e:
        generator.generate(hello, {"humor": 3}, max_new_tokens=12, seed=5, best_of=4)
    assert e.value.field == "best_of"
    generator.apm = LengthApm(demo_schema)
    try:
        # The same candidates, drawn one by one with the seeds best-of uses.
        singles = [generator.generate(hello, {"humor": 3}, max_new_tokens=12, temperature=1.0, seed=5 + i)
                   for i in range(4)]
        lengths = [len(r.text) / 10 for r in singles]
        best = min(range(4), key=lambda i: ((lengths[i] - 3) ** 2, i))
        calls = generator.apm.calls
        result = generator.generate(hello, {"humor": 3}, max_new_tokens=12, temperature=1.0, seed=5, best_of=4)
        assert generator.apm.calls == calls + 1  # every candidate scored in one APM call
        assert result.text == singles[best].text
        assert result.candidates == 4
        assert result.measured["humor"] == pytest.approx(lengths[best], abs=1e-4)
        assert result.to_dict()["candidates"] == 4
        again = generator.generate(hello, {"humor": 3}, max_new_tokens=12, temperature=1.0, seed=5, best_of=4)
        assert again.text == result.text
        # Batched with another request, each request keeps its own candidates and winner.
        batch = generator.generate_batch([
            GenerationRequest(hello, {"humor": 3}, 12, 1.0, 0.95, 5, best_of=4),
            GenerationRequest(hello, {"creativity": 0}, 12, 1.0, 1.0, 9, best_of=2),
        ])
        assert batch[0].text == result.text and batch[1].candidates == 2
        with pytest.raises(GenerationError) as e:
            generator.generate(hello, {"humor": 3}, best_of=0)
        assert e.value.field == "best_of"
    finally:
        generator.apm = None


# ---------------------------------------------------------------- REST
def test_rest_best_of_needs_an_apm(build_tiny_policy, hello, make_client, wait_ready, tmp_path):
    policy = build_tiny_policy(tmp_path / "policy")
    with make_client(policy) as c:
        wait_ready(c)
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4, "best_of": 4})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "best_of"
        assert "--apm" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4, "best_of": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_rest_best_of_returns_the_candidate_the_apm_puts_closest(build_tiny_apm, build_tiny_policy, hello, make_client, sse_events, wait_ready, tmp_path):
    from steer.models.apm import AttributePredictor

    policy = build_tiny_policy(tmp_path / "policy")
    apm_dir = build_tiny_apm(tmp_path / "apm")
    apm = AttributePredictor.load(apm_dir)
    with make_client(policy, apm=str(apm_dir)) as c:
        wait_ready(c)
        body = {"messages": hello, "max_tokens": 10, "temperature": 1.0, "seed": 11, "attributes": {"humor": 4}}
        # n=4 with seed 11 draws exactly best_of=4's candidates (seeds 11..14).
        cands = [ch["message"]["content"] for ch in
                 c.post("/v1/chat/completions", json={**body, "n": 4}).json()["choices"]]
        r = c.post("/v1/chat/completions", json={**body, "best_of": 4})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        humor = apm.predict([hello + [{"role": "assistant", "content": t}] for t in cands])[:, 1]
        best = min(range(4), key=lambda i: ((humor[i] - 4) ** 2, i))
        assert choice["message"]["content"] == cands[best]
        assert choice["candidates"] == 4
        assert choice["scores"]["humor"] == pytest.approx(humor[best], abs=1e-3)
        assert r.json()["usage"]["completion_tokens"] >= len(cands)  # every candidate's tokens count
        stream = c.post("/v1/chat/completions", json={**body, "best_of": 4, "stream": True})
        events = sse_events(stream.text)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert text == cands[best]
        final = [e for e in events[:-1] if e["choices"] and e["choices"][0].get("finish_reason")][0]
        assert final["choices"][0]["candidates"] == 4
        # Weights name attributes of the comparison; others are a 400 naming the field.
        r = c.post("/v1/chat/completions", json={**body, "best_of": 2, "best_of_weights": {"quality": 1}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of_weights"
        r = c.post("/v1/chat/completions", json={**body, "best_of": 64})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_generate_cli_best_of(build_tiny_apm, build_tiny_policy, demo_schema, tmp_path, capsys):
    import json

    from steer.cli.main import main as cli

    policy = build_tiny_policy(tmp_path / "policy")
    apm_dir = build_tiny_apm(tmp_path / "apm")
    args = ["generate", "--policy", str(policy), "--prompt", "Tell me a story.", "--attr", "humor=4",
            "--max-new-tokens", "6", "--seed", "2", "--best-of", "3"]
    assert cli(args) == 2
    assert "[best_of]" in capsys.readouterr().err
    assert cli([*args, "--apm", str(apm_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidates"] == 3 and set(out["measured"]) == set(demo_schema.names)


def test_best_of_bench_runs_end_to_end(build_tiny_apm, build_tiny_policy, tmp_path):
    """bench/best_of.py on the tiny policy (a couple of requests; the numbers are not checked)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    policy = build_tiny_policy(tmp_path / "policy")
    apm_dir = build_tiny_apm(tmp_path / "apm")
    out = subprocess.run([sys.executable, str(repo / "bench" / "best_of.py"), "--policy", str(policy), "--apm",
                          str(apm_dir), "--prompts", "2", "--repeats", "1", "--max-new-tokens", "4", "--sizes", "1,2"],
                         capture_output=True, text=True, timeout=300, cwd=repo,
                         env={**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout[: out.stdout.index("\n}\n") + 2])
    assert set(report["seconds_per_request"]) == {"1", "2"} and report["cost_vs_first"]["1"] == 1.0
