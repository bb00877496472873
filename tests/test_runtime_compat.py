"""The transformers-internals shims (steer.runtime.compat) against the installed transformers: a
release that moves what they lean on fails here, naming the shim, not deep inside a decode."""

from __future__ import annotations

import transformers

from steer.runtime import compat


def test_installed_transformers_has_everything_the_runtime_shims_use():
    problems = compat.check_transformers()
    assert not problems, (
        "transformers internals that steer.runtime.compat relies on have changed; update the shims "
        "there (and TESTED_TRANSFORMERS_VERSIONS) before using this transformers:\n  " + "\n  ".join(problems))


def test_the_check_reports_a_missing_attribute(monkeypatch):
    # The check itself must be able to fail: a cache layer class without what the shims use.
    monkeypatch.setattr(compat, "DynamicLayer", type("DynamicLayer", (), {"update": lambda self: None}))
    problems = compat.check_transformers()
    assert any("DynamicLayer.lazy_initialization is gone" in p for p in problems)
    assert not any("DynamicLayer.update " in p for p in problems)
    assert all(transformers.__version__ in p and "tested:" in p for p in problems)


def test_tested_versions_name_a_release():
    assert compat.TESTED_TRANSFORMERS_VERSIONS
    assert all(v.count(".") == 2 for v in compat.TESTED_TRANSFORMERS_VERSIONS)


def test_attention_switch_is_undone_even_when_the_forward_fails():
    from transformers import LlamaConfig

    class Model:
        config = LlamaConfig()

    model = Model()
    before = compat.attention_implementation(model)
    try:
        with compat.using_attention(model, "eager"):
            assert compat.attention_implementation(model) == "eager"
            raise RuntimeError("forward failed")
    except RuntimeError:
        pass
    assert compat.attention_implementation(model) == before
