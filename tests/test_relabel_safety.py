"""steer relabel never loses data: it refuses to overwrite files it did not write (the input
above all), finishes Parquet output crash-safely, writes its progress record atomically, and
resumes only when the data and the APM are unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from steer.training import relabel
from steer.training.relabel import SIDECAR_SUFFIX, RelabelConfig, RelabelError
from steer.training.relabel import main as relabel_main


@pytest.fixture
def data(shared_path, tmp_path) -> Path:
    source = shared_path("data", "helpsteer2", "sample.jsonl")
    copy = tmp_path / "input.jsonl"
    copy.write_bytes(b"".join(source.read_bytes().splitlines(keepends=True)[:12]))
    return copy


def run(apm, data, output, **kw):
    return relabel_main(RelabelConfig(model=str(apm), data=str(data), format="helpsteer", output=str(output),
                                      batch_size=4, chunk_size=3, device="cpu", **kw))


def source_ids(data: Path) -> list:
    from steer.data import load_conversations

    convs, _ = load_conversations(data, "helpsteer")
    return [c.id for c in convs]


def ids_of(path: Path) -> list:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).column("id").to_pylist()
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_output_that_is_the_input_is_refused_and_the_input_kept(tiny_apm_dir, data):
    before = data.read_bytes()
    with pytest.raises(RelabelError, match="input file itself") as info:
        run(tiny_apm_dir, data, data)
    assert info.value.field == "output" and data.read_bytes() == before
    link = data.with_name("same.jsonl")
    link.hardlink_to(data)
    with pytest.raises(RelabelError):
        run(tiny_apm_dir, data, link)
    assert data.read_bytes() == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_existing_file_steer_did_not_write_is_never_replaced(tiny_apm_dir, data, tmp_path, overwrite):
    precious = tmp_path / "notes.jsonl"
    precious.write_text('{"mine": true}\n')
    with pytest.raises(RelabelError, match="not written by steer relabel"):
        run(tiny_apm_dir, data, precious, overwrite=overwrite)
    assert precious.read_text() == '{"mine": true}\n'


def test_a_kill_while_parquet_parts_are_cleaned_up_loses_no_rows(tiny_apm_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "out.parquet"
    removed = []
    unlink = Path.unlink

    def dies_after_one(self, *args, **kwargs):
        if self.name.startswith("part-") and removed:
            raise KeyboardInterrupt("killed while deleting part files")
        removed.append(self.name)
        return unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_apm_dir, data, out)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert run(tiny_apm_dir, data, out) == 0
    assert ids_of(out) == source_ids(data)
    assert not out.with_name(out.name + ".parts").exists()


def test_a_kill_before_completion_is_recorded_resumes_to_the_full_file(tiny_apm_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "out.parquet"
    write = relabel.write_json_atomic

    def dies_on_completion(path, state):
        if state.get("complete"):
            raise KeyboardInterrupt("killed just after the final file was renamed into place")
        return write(path, state)

    monkeypatch.setattr(relabel, "write_json_atomic", dies_on_completion)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_apm_dir, data, out)
    monkeypatch.setattr(relabel, "write_json_atomic", write)
    assert run(tiny_apm_dir, data, out) == 0
    assert ids_of(out) == source_ids(data)


def test_progress_records_are_atomic_and_a_torn_one_is_a_clear_error(tiny_apm_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    run(tiny_apm_dir, data, out, limit=6)
    sidecar = out.with_name(out.name + SIDECAR_SUFFIX)
    record = sidecar.read_text()

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(relabel.os, "fsync", crash)
    with pytest.raises(OSError):
        relabel.write_json_atomic(sidecar, {"half": "written"})
    monkeypatch.undo()
    assert sidecar.read_text() == record  # the old record, whole

    sidecar.write_text(record[: len(record) // 2])  # what a non-atomic write left after a kill
    with pytest.raises(RelabelError, match="damaged") as info:
        run(tiny_apm_dir, data, out, limit=6)
    assert info.value.field == "output"


def test_resume_refuses_changed_data_or_apm_contents(tiny_apm_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    run(tiny_apm_dir, data, out, limit=6)
    original = data.read_bytes()
    lines = original.splitlines(keepends=True)
    data.write_bytes(b"".join([lines[1], lines[0], *lines[2:]]))  # same path, same size, other rows
    with pytest.raises(RelabelError, match="data_sha256"):
        run(tiny_apm_dir, data, out, limit=6)
    data.write_bytes(original)

    apm = tmp_path / "apm"
    shutil.copytree(tiny_apm_dir, apm)
    out2 = tmp_path / "out2.jsonl"
    run(apm, data, out2, limit=6)
    config = apm / "steer_config.json"
    target = config if config.exists() else next(p for p in apm.iterdir() if p.is_file())
    target.write_bytes(target.read_bytes() + b"\n")  # retrained/edited in place
    with pytest.raises(RelabelError, match="model_sha256"):
        run(apm, data, out2, limit=6)
