"""`steer export gguf`: policies as GGUF files that transformers, llama.cpp and steer itself load."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.assets import shared_path

gguf = pytest.importorskip("gguf", reason="the [gguf] extra is not installed")

# Conversations the stories260K policy below never trains on (it sees the first 48).
HELD_OUT = range(300, 306)


def _held_out_ids(policy) -> list[int]:
    from steer.demo_data import rated_path

    rows = Path(rated_path()).read_text(encoding="utf-8").splitlines()
    ids: list[int] = []
    for i in HELD_OUT:
        messages = json.loads(rows[i])["messages"]
        ids += policy.template.tokenize(messages, policy.tokenizer, mode="train").input_ids
    return ids


def _argmax_agreement(logits_a, logits_b) -> float:
    a, b = np.asarray(logits_a).argmax(-1), np.asarray(logits_b).argmax(-1)
    return float((a == b).mean())


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _load_with_transformers(path: Path):
    """The file through transformers alone (``gguf_file=``), not through steer's loader."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def stories_policy(tmp_path_factory):
    """A LoRA policy on the real stories260K, three steps of SFT (its template markers are added
    to the vocabulary, so embeddings are resized and trained too)."""
    from steer.demo_data import rated_path
    from steer.training.sft import SftConfig
    from steer.training.sft import main as sft

    base = shared_path("models", "stories260K")
    out = tmp_path_factory.mktemp("stories") / "policy"
    sft(SftConfig(base_model=str(base), data=str(rated_path()), output_dir=str(out), limit=48, max_steps=3,
                  learning_rate=5e-3, per_device_train_batch_size=16, max_length=128, eval_fraction=0.0, lora_r=4, logging_steps=1))
    return out


@pytest.fixture(scope="module")
def reference(stories_policy):
    from steer.models.policy import load_policy

    policy = load_policy(stories_policy, device="cpu", dtype="float32")
    ids = _held_out_ids(policy)
    return policy, ids, _logits(policy.model, ids)


def _export(policy_dir, out: Path, dtype: str = "f32", **kw) -> Path:
    from steer.cli.export_gguf import ExportGgufConfig, export_policy

    return export_policy(ExportGgufConfig(policy=str(policy_dir), output=str(out), dtype=dtype, **kw))


@pytest.fixture(scope="module")
def stories_f32(stories_policy, tmp_path_factory):
    return _export(stories_policy, tmp_path_factory.mktemp("f32") / "stories-policy.gguf")


def test_f32_export_agrees_with_the_policy_in_transformers(stories_f32, reference):
    policy, ids, expected = reference
    assert len(ids) > 300
    model = _load_with_transformers(stories_f32)
    got = _logits(model, ids)
    assert _argmax_agreement(got, expected) >= 0.99
    # f32 all the way: the same numbers, not merely the same argmax.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_the_file_holds_tokenizer_names_and_steer_settings(stories_f32, stories_policy):
    from gguf import GGUFReader

    from steer.models.gguf_files import read_string_field, read_steer_metadata

    reader = GGUFReader(str(stories_f32))
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.4.ffn_down.weight"} <= names
    assert "output.weight" not in names  # the policy's head is tied to its (trained) embeddings
    assert all(t.tensor_type.name == "F32" for t in reader.tensors)
    assert read_string_field(stories_f32, "tokenizer.ggml.model") == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 515  # 512 + the template's three markers
    meta = read_steer_metadata(stories_f32)
    saved = json.loads((stories_policy / "steer_config.json").read_text())
    assert json.loads(meta["steer.schema"]) == saved["schema"]
    assert json.loads(meta["steer.core.template"]) == saved["template"]
    assert meta["steer.kind"] == "policy" and meta["steer.version"] and meta["general.type"] == "model"


def test_steer_loads_the_file_as_the_same_policy(stories_f32, stories_policy, reference):
    from steer.runtime.generator import SteerGenerator

    policy, ids, _ = reference
    loaded = SteerGenerator.load(stories_f32, device="cpu", dtype="float32")
    assert loaded.schema.to_dict() == policy.schema.to_dict()
    assert loaded.template.to_dict() == policy.template.to_dict()
    # The tokenizer inside the file tokenizes prompts exactly like the policy's own.
    from steer.models.policy import load_policy

    from_file = load_policy(stories_f32, device="cpu", load_model=False)
    assert _held_out_ids(from_file) == ids
    original = SteerGenerator.load(stories_policy, device="cpu", dtype="float32")
    messages = [{"role": "user", "content": "Can you fix my sword?"}]
    for attributes in ({"humor": 4}, {"humor": 0, "helpfulness": 4}):
        a = original.generate(messages, attributes, max_new_tokens=24, temperature=0.0)
        b = loaded.generate(messages, attributes, max_new_tokens=24, temperature=0.0)
        assert a.text == b.text and a.text.strip()
    assert loaded.trained_values == original.trained_values is not None


def test_steer_generate_takes_the_file_as_policy(stories_f32, stories_policy, capsys):
    from steer.cli.main import main

    replies = []
    for policy in (stories_policy, stories_f32):
        assert main(["generate", "--policy", str(policy), "--prompt", "Where is the inn?", "--attr", "humor=4",
                     "--temperature", "0", "--max-new-tokens", "16", "--device", "cpu"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()


@pytest.mark.parametrize("dtype,floor", [("f16", 0.99), ("q8_0", 0.95)])
def test_reduced_precision_exports(stories_policy, reference, tmp_path, dtype, floor):
    from gguf import GGUFReader

    _, ids, expected = reference
    path = _export(stories_policy, tmp_path / f"policy-{dtype}.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["output_norm.weight"] == "F32"  # norms stay f32, as llama.cpp writes them
    assert types["blk.0.attn_q.weight"] == {"f16": "F16", "q8_0": "Q8_0"}[dtype]
    agreement = _argmax_agreement(_logits(_load_with_transformers(path), ids), expected)
    print(f"{dtype}: teacher-forced argmax agreement {agreement:.4f} over {len(ids)} positions")
    assert agreement >= floor


def test_byte_level_tokenizer_policy_exports_as_gpt2_vocabulary(build_random_policy, tmp_path):
    """The demo's kind of policy: its own byte-level BPE tokenizer, a random LoRA on a tiny Llama."""
    from steer.core.attributes import get_schema
    from steer.models.gguf_files import read_string_field
    from steer.models.policy import load_policy

    policy_dir = build_random_policy(tmp_path / "policy", schema=get_schema("oasst"))
    path = _export(policy_dir, tmp_path / "tiny.gguf")
    assert read_string_field(path, "tokenizer.ggml.model") == "gpt2"
    assert read_string_field(path, "tokenizer.ggml.pre") == "gpt-2"
    policy, from_file = load_policy(policy_dir, device="cpu"), load_policy(path, device="cpu")
    messages = [{"role": "system", "content": "You are a shopkeeper."},
                {"role": "user", "content": "Tell me about item 41, please!  Two spaces, café."},
                {"role": "assistant", "content": "Item 41 is a fine thing.", "labels": {"humor": 3}}]
    ids = policy.template.tokenize(messages, policy.tokenizer).input_ids
    assert from_file.template.tokenize(messages, from_file.tokenizer).input_ids == ids
    assert from_file.tokenizer.decode(ids) == policy.tokenizer.decode(ids)
    np.testing.assert_allclose(_logits(from_file.model, ids), _logits(policy.model, ids), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def gguf_base_policy(tmp_path_factory):
    """A pure LoRA policy on stories260K's own GGUF file (no tokens added, so no embeddings trained)."""
    from steer.demo_data import rated_path
    from steer.training.sft import SftConfig
    from steer.training.sft import main as sft

    work = tmp_path_factory.mktemp("gguf-base")
    base = work / "stories260K.gguf"
    base.symlink_to(shared_path("models", "stories260K", "stories260K.gguf"))
    out = work / "policy"
    sft(SftConfig(base_model=str(base), data=str(rated_path()), output_dir=str(out), limit=16, max_steps=2,
                  learning_rate=5e-3, per_device_train_batch_size=8, max_length=320, eval_fraction=0.0, lora_r=4,
                  lora_alpha=8, logging_steps=1,
                  add_marker_tokens=False))
    return base, out


def test_adapter_only_export_is_a_llama_cpp_lora(gguf_base_policy, tmp_path):
    """llama.cpp applies an adapter as W + alpha/r * B @ A on the base file's tensors: done here by
    hand, it must give the merged policy's weights in llama.cpp's layout."""
    from gguf import GGUFReader

    from steer.models.gguf_writer import llama_tensors
    from steer.models.policy import load_policy

    base, policy_dir = gguf_base_policy
    path = _export(policy_dir, tmp_path / "adapter.gguf", adapter_only=True)
    reader = GGUFReader(str(path))
    field = lambda key: reader.fields[key].parts[reader.fields[key].data[0]]  # noqa: E731
    assert bytes(field("general.type")).decode() == "adapter"
    assert bytes(field("adapter.type")).decode() == "lora"
    alpha = float(field("adapter.lora.alpha")[0])
    assert alpha == 8.0
    lora = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in lora and "blk.0.attn_q.weight.lora_b" in lora
    base_tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(str(base)).tensors}
    merged = dict(llama_tensors(load_policy(policy_dir, device="cpu", dtype="float32").model))
    adapted = 0
    for name, want in merged.items():
        got = base_tensors[name].reshape(want.shape)
        if f"{name}.lora_a" in lora:
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
            assert a.shape[0] == b.shape[1] == 4  # rank x in, out x rank
            got = got + alpha / a.shape[0] * (b @ a)
            adapted += 1
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert adapted == 5 * 7  # every projection of the five layers


def test_adapter_only_refuses_what_a_lora_file_cannot_carry(stories_policy, tmp_path):
    from steer.models.gguf_writer import GgufExportError, write_lora_gguf
    from steer.models.modeling import load_causal_lm

    with pytest.raises(GgufExportError, match="needs a policy trained on a .gguf base"):
        _export(stories_policy, tmp_path / "a.gguf", adapter_only=True)
    config = load_causal_lm(shared_path("models", "stories260K"), device="cpu").config
    with pytest.raises(GgufExportError, match="trains whole modules"):
        write_lora_gguf(stories_policy, config, tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_bad_inputs_are_clear_cli_errors(stories_f32, tmp_path, capsys):
    from steer.cli.main import main
    from steer.core.errors import SteerError
    from steer.models.policy import load_policy

    assert main(["export", "gguf", "--policy", str(tmp_path / "missing"), "--output", str(tmp_path / "x.gguf")]) == 2
    assert "--policy" in capsys.readouterr().err
    assert main(["export", "gguf", "--policy", str(tmp_path), "--output", str(tmp_path / "x.gguf"),
                 "--dtype", "q4_k"]) == 2
    err = capsys.readouterr().err
    assert "--dtype 'q4_k'" in err and "f32, f16, q8_0" in err
    assert main(["export", "gguf", "--policy", str(tmp_path), "--output", str(stories_f32)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "gguf", "--policy", str(tmp_path), "--output", str(tmp_path / "x.bin")]) == 2
    assert ".gguf" in capsys.readouterr().err
    assert main(["export", "gguf", "--policy", str(tmp_path), "--output", str(tmp_path / "x.gguf")]) == 2
    assert "steer_config.json is missing" in capsys.readouterr().err
    assert main(["export", "nope"]) == 2
    # A GGUF base model is not a policy: it has no steer settings.
    with pytest.raises(SteerError, match="without steer metadata"):
        load_policy(shared_path("models", "stories260K", "stories260K.gguf"), device="cpu", load_model=False)
    assert not (tmp_path / "x.gguf").exists()


def test_cli_writes_the_file(stories_policy, tmp_path, capsys):
    from steer.cli.main import main

    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", "--policy", str(stories_policy), "--output", str(out), "--dtype", "f16"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.llamacpp
def test_llama_cpp_loads_the_export_and_the_adapter(stories_f32, reference, gguf_base_policy, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [llamacpp] extra) is not installed")
    from steer.models.policy import load_policy

    policy, ids, expected = reference

    def llama_cpp_logits(model_path, token_ids, **kw):
        llm = llama_cpp.Llama(model_path=str(model_path), logits_all=True, n_ctx=len(token_ids) + 8, n_threads=1,
                              verbose=False, **kw)
        llm.eval(token_ids)
        return np.asarray(llm.scores[: len(token_ids)]), llm

    got, llm = llama_cpp_logits(stories_f32, ids)
    assert _argmax_agreement(got, expected) >= 0.99
    text = "Once upon a time, there was a little dog named Max."
    assert llm.tokenize(text.encode(), add_bos=True) == policy.tokenizer(text).input_ids

    base, policy_dir = gguf_base_policy
    adapter = _export(policy_dir, tmp_path / "adapter.gguf", adapter_only=True)
    lora_policy = load_policy(policy_dir, device="cpu", dtype="float32")
    lora_ids = _held_out_ids(lora_policy)
    got, _ = llama_cpp_logits(os.fspath(base), lora_ids, lora_path=str(adapter))
    assert _argmax_agreement(got, _logits(lora_policy.model, lora_ids)) >= 0.99


def test_models_and_tokenizers_gguf_cannot_describe_are_refused(tiny_llama, tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from steer.models.gguf_writer import GgufExportError, write_llama_gguf

    llama_vocab = AutoTokenizer.from_pretrained(str(shared_path("models", "stories260K")))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(GgufExportError, match="only Llama-architecture models.*'gpt2'"):
        write_llama_gguf(gpt2, llama_vocab, tmp_path / "gpt2.gguf")
    with pytest.raises(GgufExportError, match="512 tokens but the model only 97"):
        write_llama_gguf(tiny_llama, llama_vocab, tmp_path / "small.gguf")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1},
                                                                                    unk_token="[UNK]")))
    with pytest.raises(GgufExportError, match="WordPiece model"):
        write_llama_gguf(tiny_llama, wordpiece, tmp_path / "wordpiece.gguf")
    with pytest.raises(GgufExportError, match="unknown dtype 'bf16'"):
        write_llama_gguf(tiny_llama, wordpiece, tmp_path / "bf16.gguf", dtype="bf16")
    assert not list(tmp_path.iterdir())  # no partial files left
