import json
import os
import signal
import subprocess
import sys

import torch

from steer.cli.main import main as cli_main
from steer.data import load_conversations
from steer.training.relabel import RelabelConfig
from steer.training.relabel import main as relabel_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_relabel_annotates_every_assistant_turn(shared_path, tiny_apm_dir, tmp_path):
    out = tmp_path / "hh.jsonl"
    data = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(data), format="hh", output=str(out), limit=40,
                               batch_size=8, chunk_size=16))
    rows = read_jsonl(out)
    source, _ = load_conversations(data, "hh", limit=40)
    assert [r["id"] for r in rows] == [c.id for c in source]
    names = ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    for row in rows:
        assert row["provenance"]["apm"] == str(tiny_apm_dir.resolve())
        assert row["provenance"]["schema"] == "helpsteer"
        for m in row["messages"]:
            if m["role"] != "assistant":
                assert "labels" not in m
                continue
            assert list(m["labels"]) == names and all(0 <= v <= 4 and isinstance(v, int) for v in m["labels"].values())
            assert m["labels"] == {k: min(4, max(0, round(v))) for k, v in m["predictions"].items()}
            assert m["label_string"] == ",".join(f"{k}:{v}" for k, v in m["labels"].items())
    # The output is steer's native format: SFT reads it back as labelled conversations.
    back, report = load_conversations(out, "steer", schema="helpsteer")
    assert report.bad == [] and len(back) == 40
    assert all(m.labels for c in back for m in c.messages if m.role == "assistant")
    # ... and `datasets` loads it.
    import datasets

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == 40 and "label_string" in ds.column_names


def test_batched_predictions_match_one_at_a_time(shared_path, tiny_apm_dir):
    from steer.models.apm import AttributePredictor

    predictor = AttributePredictor.load(tiny_apm_dir, device="cpu")
    convs, _ = load_conversations(shared_path("data", "helpsteer2", "sample.jsonl"), "helpsteer", limit=12)
    items = [c.messages for c in convs]
    batched = predictor.predict(items, batch_size=5, sort_by_length=True)
    single = [predictor.predict([it], batch_size=1)[0] for it in items]
    assert batched.shape == (12, 5)
    assert abs(batched - single).max() < 1e-4


def test_scoring_leaves_cudnn_attention_out(shared_path, tiny_apm_dir, sdpa_backends):
    """Each scoring batch has its own length, and cuDNN attention would recompile for each."""
    from steer.models.apm import AttributePredictor

    predictor = AttributePredictor.load(tiny_apm_dir, device="cpu")
    convs, _ = load_conversations(shared_path("data", "helpsteer2", "sample.jsonl"), "helpsteer", limit=6)
    predictor.predict([c.messages for c in convs], batch_size=3)
    assert sdpa_backends and set(sdpa_backends) == {(False, True, True, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_keep_human_labels_and_parquet(shared_path, tiny_apm_dir, tmp_path):
    out = tmp_path / "hs.parquet"
    data = shared_path("data", "helpsteer2", "sample.jsonl")
    relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(data), format="helpsteer", output=str(out),
                               keep_human_labels=True, limit=10, chunk_size=4))
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert len(ds) == 10 and not (tmp_path / "hs.parquet.parts").exists()
    source, _ = load_conversations(data, "helpsteer", limit=10)
    for row, conv in zip(ds, source):
        reply = row["messages"][-1]
        assert reply["labels"] == conv.messages[-1].labels == reply["human_labels"]
        assert set(reply["predictions"]) == set(reply["labels"])


def test_completed_run_is_not_redone_and_mismatch_is_refused(shared_path, tiny_apm_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    data = str(shared_path("data", "helpsteer2", "sample.jsonl"))
    cfg = RelabelConfig(model=str(tiny_apm_dir), data=data, format="helpsteer", output=str(out), limit=6)
    relabel_main(cfg)
    mtime = out.stat().st_mtime_ns
    relabel_main(cfg)
    assert out.stat().st_mtime_ns == mtime and len(read_jsonl(out)) == 6
    rc = cli_main(["relabel", "--model", str(tiny_apm_dir), "--data", data, "--format", "helpsteer",
                   "--output", str(out), "--limit", "7"])
    assert rc == 2  # a different run would be appended to the wrong file
    assert len(read_jsonl(out)) == 6


def test_torn_last_line_is_repaired_on_resume(shared_path, tiny_apm_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    data = str(shared_path("data", "helpsteer2", "sample.jsonl"))
    cfg = RelabelConfig(model=str(tiny_apm_dir), data=data, format="helpsteer", output=str(out), limit=9,
                        chunk_size=3)
    relabel_main(cfg)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    # Simulate a crash: three rows durable, the fourth half-written, the run not marked complete.
    out.write_text("".join(lines[:3]) + lines[3][:25])
    sidecar = tmp_path / "o.jsonl.relabel.json"
    state = json.loads(sidecar.read_text())
    state["complete"] = False
    sidecar.write_text(json.dumps(state))
    relabel_main(cfg)
    assert out.read_text() == full


def test_relabel_cli_errors_are_one_line(tiny_apm_dir, tmp_path, capsys):
    rc = cli_main(["relabel", "--model", str(tiny_apm_dir), "--data", str(tmp_path / "missing.jsonl"),
                   "--format", "jsonl", "--output", str(tmp_path / "o.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("steer relabel: error") and "no such file" in err
    rc = cli_main(["relabel", "--model", str(tmp_path), "--data", "x.jsonl", "--output", str(tmp_path / "o.txt")])
    assert rc == 2 and "[output]" in capsys.readouterr().err


# The relabel command as a user runs it, except that its second durable write stops the process
# (SIGSTOP) with half a line on disk: the test kills it at that state, not after some time.
_STOP_IN_SECOND_WRITE = """
import json, os, signal, sys
from steer.data import jsonl

append, writes = jsonl.ResumableJsonl.append, []

def append_then_stop_midway(self, rows):
    rows = list(rows)
    writes.append(len(rows))
    if len(writes) == 1:
        return append(self, rows)
    line = json.dumps(rows[0]) + "\\n"
    with open(self.path, "a", encoding="utf-8") as f:
        f.write(line[: len(line) // 2])
    os.kill(os.getpid(), signal.SIGSTOP)

jsonl.ResumableJsonl.append = append_then_stop_midway
from steer.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_rerun_gives_every_row_exactly_once(shared_path, tiny_apm_dir, tmp_path):
    data = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    out = tmp_path / "killed.jsonl"
    args = ["relabel", "--model", str(tiny_apm_dir), "--data", str(data), "--format", "hh", "--output", str(out),
            "--chunk-size", "4", "--batch-size", "4", "--limit", "300", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", _STOP_IN_SECOND_WRITE, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the child has stopped itself
    assert os.WIFSTOPPED(status), f"relabel ended instead of stopping: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    written = out.read_bytes()
    assert written.count(b"\n") == 4 and not written.endswith(b"\n")  # the first chunk, then a torn line
    subprocess.run([sys.executable, "-m", "steer.cli.main", *args], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    rows = read_jsonl(out)
    expected, _ = load_conversations(data, "hh", limit=300)
    assert [r["id"] for r in rows] == [c.id for c in expected]


# ----------------------------------------------------------------------------------------------
# Issue 17: relabel output round trips (Parquet nested columns), messages, label histograms, progress.

def test_parquet_output_is_nested_and_loads_back_with_format_steer(shared_path, tiny_apm_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steer.training.sft import SftConfig, load_sft_conversations

    out = tmp_path / "hh.parquet"
    data = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(data), format="hh", output=str(out), limit=12,
                               chunk_size=5))
    table = pq.read_table(out)
    assert pa.types.is_list(table.schema.field("messages").type)
    for column in ("meta", "predictions", "provenance"):
        assert pa.types.is_struct(table.schema.field(column).type), column
    back, report = load_conversations(out, "steer", schema="helpsteer")
    source, _ = load_conversations(data, "hh", limit=12)
    assert report.bad == [] and [c.id for c in back] == [c.id for c in source]
    assert [c.meta for c in back] == [c.meta for c in source] and back[0].meta == {"preference": "chosen"}
    assert all(set(m.labels) == set(back[0].messages[1].labels) for c in back for m in c.messages
               if m.role == "assistant")
    # steer sft and steer relabel read it with --format steer.
    convs, schema = load_sft_conversations(SftConfig(base_model="x", data=str(out), output_dir="y", format="steer"))
    assert len(convs) == 12 and schema.name == "helpsteer"
    again = tmp_path / "again.jsonl"
    relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(out), format="steer", output=str(again)))
    assert [r["id"] for r in read_jsonl(again)] == [c.id for c in source]


def test_parquet_with_json_text_columns_still_loads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = {"id": "a", "group": "g", "source": "hh",
           "messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello", "labels": {"helpfulness": 3}}],
           "meta": {"preference": "chosen"}, "predictions": {"helpfulness": 3.1}}
    old = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}
    pq.write_table(pa.Table.from_pylist([old]), tmp_path / "old.parquet")
    (conv,), report = load_conversations(tmp_path / "old.parquet", "steer", schema="helpsteer")
    assert report.bad == [] and conv.messages[1].labels == {"helpfulness": 3} and conv.meta == {"preference": "chosen"}


def test_relabel_with_default_format_keeps_meta_and_names_the_source(shared_path, tiny_apm_dir, tmp_path):
    first = tmp_path / "first.jsonl"
    data = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(data), format="hh", output=str(first), limit=4))
    second = tmp_path / "second.jsonl"
    relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(first), output=str(second)))  # --format jsonl
    rows = read_jsonl(second)
    assert [r["meta"] for r in rows] == [{"preference": "chosen"}, {"preference": "rejected"}] * 2
    assert {r["source"] for r in rows} == {"hh"}
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(plain), output=str(tmp_path / "p.jsonl")))
    assert read_jsonl(tmp_path / "p.jsonl")[0]["source"] == "plain.jsonl"


def test_relabel_prints_histogram_and_sidecar_counts_rows_mid_run(shared_path, tiny_apm_dir, tmp_path, caplog, monkeypatch):
    import logging

    from steer.training import relabel

    out = tmp_path / "o.jsonl"
    sidecar = tmp_path / "o.jsonl.relabel.json"
    seen = []
    write = relabel._JsonlSink.write

    def recording_write(self, rows):
        write(self, rows)
        seen.append((len(read_jsonl(out)), json.loads(sidecar.read_text())["rows"]))

    monkeypatch.setattr(relabel._JsonlSink, "write", recording_write)
    data = shared_path("data", "helpsteer2", "sample.jsonl")
    with caplog.at_level(logging.INFO, logger="steer.training.relabel"):
        relabel_main(RelabelConfig(model=str(tiny_apm_dir), data=str(data), format="helpsteer", output=str(out),
                                   limit=10, chunk_size=4))
    # Seen from inside each durable write: the sidecar counts every row written before it (it is
    # updated right after each write), instead of staying at 0 until the end.
    assert seen == [(4, 0), (8, 4), (10, 8)]
    assert json.loads(sidecar.read_text())["rows"] == 10
    state = json.loads(sidecar.read_text())
    assert sum(state["label_histogram"]["helpfulness"].values()) == 10
    assert "labels written" in caplog.text and "helpfulness" in caplog.text.split("labels written")[1]


def test_limit_stops_reading_a_parquet_file_early(shared_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=500)
    convs, report = load_conversations(tmp_path / "big.parquet", "parquet", limit=3)
    assert len(convs) == 3 and report.rows <= 1024
    # JSONL (gzipped too) is read line by line: hh gives two conversations per line.
    convs, report = load_conversations(shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz"), "hh", limit=10)
    assert len(convs) == 10 and report.rows == 5


def test_relabel_of_hh_data_without_format_hh_suggests_it(shared_path, tiny_apm_dir, tmp_path, capsys):
    data = shared_path("data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    rc = cli_main(["relabel", "--model", str(tiny_apm_dir), "--data", str(data), "--output", str(tmp_path / "o.jsonl"),
                   "--limit", "20"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("steer relabel: error [data]: no conversations could be read")
    assert "pass --format hh" in err
