"""steer.data.jsonl: the resumable JSONL output of `steer relabel` and `steer generate --input`."""

import json

import pytest

from steer.data.jsonl import JsonlOutputError, ResumableJsonl


def test_appended_batches_read_back_in_order(tmp_path):
    out = ResumableJsonl(tmp_path / "sub" / "out.jsonl")
    assert not out.exists() and out.resume() == [] and out.repair() == 0
    assert out.append({"id": i, "text": "é"} for i in range(3)) == 3
    assert out.append([{"id": 3}]) == 1
    assert [r["id"] for r in out.resume()] == [0, 1, 2, 3]
    assert "é" in out.path.read_text(encoding="utf-8")  # written as text, not \\u escapes
    out.reset()
    assert not out.exists()


def test_a_torn_last_line_is_cut_off_and_the_rest_kept(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    whole = json.dumps({"id": "a"}) + "\n" + json.dumps({"id": "b"}) + "\n"
    path.write_text(whole + json.dumps({"id": "c", "text": "cut off"})[:9])
    out = ResumableJsonl(path)
    assert [r["id"] for r in out.resume()] == ["a", "b"]
    assert path.read_text() == whole and "cut off mid-write" in caplog.text
    out.append([{"id": "c"}])
    assert [r["id"] for r in out.resume()] == ["a", "b", "c"]
    assert out.repair() == 3  # nothing left to repair


@pytest.mark.parametrize("line", ["not json", "[1, 2]"])
def test_a_file_that_is_not_such_output_is_an_error_naming_file_and_line(tmp_path, line):
    path = tmp_path / "notes.jsonl"
    path.write_text(json.dumps({"id": 1}) + "\n" + line + "\n")
    with pytest.raises(JsonlOutputError, match=rf"{path} line 2 is not") as e:
        ResumableJsonl(path).resume()
    assert e.value.field == "output"
    assert path.read_text().endswith(line + "\n")  # left as it was
