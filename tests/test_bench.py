"""The benchmarks run end to end on the shared tiny Llama (a few steps; numbers are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def run_bench(shared_dir, script: str, *args: str, timeout: int = 300, repo_on_path: bool = False):
    """``bench/<script> args`` run offline against the shared assets; the finished process."""
    env = {**os.environ, "STEER_SHARED": str(shared_dir), "HF_HUB_OFFLINE": "1"}
    if repo_on_path:
        env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def json_report(out, closing: str = "}"):
    """The JSON object (or list) a benchmark prints before its table."""
    end = f"\n{closing}\n"
    return json.loads(out.stdout[: out.stdout.index(end) + 2])


def test_decode_step_bench_reports_the_batching_ceiling(shared_dir, shared_path):
    shared_path("models", "stories260K")
    out = run_bench(shared_dir, "decode_step.py", "--batch", "4", "--tokens", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json_report(out)
    steps = report["decode_step_ms"]
    assert report["batch"] == 4 and steps["1"] > 0 and steps["4"] > 0 and report["mixed_step_ms"] > 0
    assert abs(report["batching_ceiling"] - 4 * steps["1"] / steps["4"]) < 0.02
    assert report["prefill_ms"] > 0 and report["ceiling_with_prefill"] > 0
    assert "batching ceiling:" in out.stdout


def test_serve_throughput_bench_keeps_each_client_on_one_connection(shared_dir, shared_path):
    shared_path("models", "stories260K")
    out = run_bench(shared_dir, "serve_throughput.py", "--clients", "2", "--requests-per-client", "3",
                    "--max-tokens", "4", "--rounds", "1", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json_report(out)
    served = report["served"]
    # Same seeds on both sides: the server generates what one-at-a-time generation does.
    assert report["requests"] == 6 and served["tokens_per_round"] == report["sequential"]["tokens"] > 0
    assert served["requests_on_kept_connections"] == 6 - 2  # each client opened one connection
    assert report["served_over_ceiling"] > 0 and report["ceiling_with_sampling"] > 0
    assert served["http_cpu_ms_per_request"] > 0  # the server process alone, measured from /proc
    assert "served / ceiling" in out.stdout and "server CPU per request" in out.stdout


def test_prompt_cache_bench_copies_later_turns_and_both_sides_agree(shared_dir, shared_path):
    shared_path("models", "stories260K")
    out = run_bench(shared_dir, "prompt_cache.py", "--turns", "2", "--conversations", "1", "--reply-tokens", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json_report(out)
    assert [t["turn"] for t in report["per_turn"]] == [0, 1] and report["same_text_both_sides"]
    # The second turn copies what the first left in the cache; without the cache nothing is copied.
    assert report["prompt_tokens_copied"]["cached"] > 8 and report["prompt_tokens_copied"]["uncached"] == 0
    assert report["prompt_tokens_fed"]["cached"] < report["prompt_tokens_fed"]["uncached"]


def test_overload_bench_runs_and_reports_outcomes(shared_dir, shared_path):
    shared_path("models", "stories260K")
    out = run_bench(shared_dir, "serve_overload.py", "--clients", "8", "--max-queue", "1", "--max-batch-size", "2",
                    "--seconds", "3", "--max-tokens", "8", timeout=600, repo_on_path=True)
    report = json_report(out)
    assert report["requests"] == sum(report["outcomes"].values()) > 0
    assert report["hung"] == 0 and report["unexpected"] == {}, report
    assert report["outcomes"].get("429+retry-after", 0) > 0  # 8 clients, 3 places: some were refused


def test_sft_throughput_bench_runs_both_batchings(shared_dir, shared_path):
    shared_path("models", "stories260K")
    out = run_bench(shared_dir, "sft_throughput.py", "--conversations", "32", "--steps", "1", "--batch-size", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "length-grouped" in out.stdout and "random" in out.stdout


def test_upstream_overhead_bench_runs_both_clients(shared_dir, shared_path):
    shared_path("models", "stories260K")
    out = run_bench(shared_dir, "upstream_overhead.py", "--streams", "2", "--tokens", "16", "--rounds", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    report, = json_report(out, closing="]")
    assert report["streams"] == 2 and report["raw_tokens_per_s"] > 0 and report["steer_tokens_per_s"] > 0
    assert report["steer_over_raw"] == round(report["steer_tokens_per_s"] / report["raw_tokens_per_s"], 3)


def test_engines_bench_alternates_rounds_and_reports_each(shared_dir, shared_path):
    """Two rounds of the torch engine on a GGUF without steer metadata (no llama.cpp needed): each
    concurrency reports every round's tokens/s and their median; an unknown engine is refused."""
    gguf = shared_path("models", "stories260K", "stories260K.gguf")
    base = ["--policy", str(gguf), "--schema", "helpsteer", "--clients", "1,2", "--lines-per-client", "1",
            "--rounds", "2", "--max-tokens", "4", "--quiet"]
    out = run_bench(shared_dir, "engines.py", *base, "--engines", "torch", timeout=600, repo_on_path=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json_report(out)
    assert report["rounds"] == 2 and report["notes"] == []
    for clients in ("1", "2"):
        measured = report["engines"]["torch"][clients]
        assert measured["rounds"] == 2 and len(measured["tokens_per_s_by_round"]) == 2
        assert measured["lines"] == 2 * int(clients) and measured["tokens_per_s"] > 0
        low, high = sorted(measured["tokens_per_s_by_round"])
        assert low <= measured["tokens_per_s"] <= high
    bad = run_bench(shared_dir, "engines.py", *base, "--engines", "torch,sglang", timeout=120, repo_on_path=True)
    assert bad.returncode == 2 and "unknown engine 'sglang'" in bad.stderr
