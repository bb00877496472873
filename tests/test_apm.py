"""The attribute prediction model: loss masking, training on tiny backbones, saving/loading,
length-sorted prediction, resume, evaluation metrics and CLI errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from steer.apm import AttributePredictor, encode_for_apm
from steer.artifacts import ArtifactError
from steer.attributes import get_schema
from steer.template import PromptTemplate
from training.apm import ApmTrainConfig, ApmTrainError, masked_mse
from training.apm import main as train_main
from training.apm_eval import ApmEvalConfig, attribute_metrics
from training.apm_eval import main as eval_main

SCHEMA_YAML = """\
name: npc
attributes:
  - {name: helpfulness, default: 4}
  - {name: humor}
  - {name: creativity}
"""

WORDS = "the a dragon sword castle laugh joke map quest gold river old wise silly bright dark".split()


def _write_data(path: Path, n: int = 40, seed: int = 0) -> Path:
    """Native steer conversations; some labels missing, a few multi-turn, groups of two."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        reply = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        labels = {"helpfulness": rng.randint(0, 4), "humor": rng.randint(0, 4), "creativity": rng.randint(0, 4)}
        if i % 3 == 0:
            del labels["creativity"]
        msgs = [{"role": "user", "content": f"question {i}: " + " ".join(rng.choice(WORDS) for _ in range(8))}]
        if i % 4 == 0:
            msgs += [{"role": "assistant", "content": "earlier reply " + reply[:20]},
                     {"role": "user", "content": "and then?"}]
        msgs.append({"role": "assistant", "content": reply, "labels": labels})
        lines.append(json.dumps({"id": f"c{i}", "group": f"g{i // 2}", "messages": msgs}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("apm")


@pytest.fixture(scope="module")
def schema_file(workdir) -> Path:
    path = workdir / "npc.yaml"
    path.write_text(SCHEMA_YAML)
    return path


@pytest.fixture(scope="module")
def data_file(workdir) -> Path:
    return _write_data(workdir / "rated.jsonl")


@pytest.fixture(scope="module")
def tiny_bert(workdir) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's (real) WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    from steer.apm import default_backbone
    from steer.modeling import load_tokenizer

    tok = load_tokenizer(default_backbone())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    path = workdir / "tiny-bert"
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gpt2(workdir, gpt2_tokenizer) -> Path:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(gpt2_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    path = workdir / "tiny-gpt2"
    GPT2Model(cfg).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


def _config(data, output, backbone, schema_file, **kw) -> ApmTrainConfig:
    base = dict(data=str(data), output=str(output), format="steer", schema=str(schema_file), backbone=str(backbone),
                max_length=64, max_steps=3, batch_size=4, learning_rate=1e-3, eval_fraction=0.25, logging_steps=1,
                device="cpu")
    base.update(kw)
    return ApmTrainConfig(**base)


@pytest.fixture(scope="module")
def trained_bert(workdir, data_file, tiny_bert, schema_file) -> Path:
    out = workdir / "apm-bert"
    train_main(_config(data_file, out, tiny_bert, schema_file))
    return out


# ---------------------------------------------------------------------------- loss
def test_masked_mse_gradient_is_zero_exactly_where_labels_are_missing():
    preds = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 3.0, float("nan")]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    loss = masked_mse(preds, targets, mask)
    loss.backward()
    grad = preds.grad
    assert torch.isfinite(loss)
    assert grad[0, 1].item() == 0.0 and grad[1, 2].item() == 0.0
    assert (grad[mask.bool()] != 0).all()
    expected = ((0.5 - 1.0) ** 2 + (2.0 - 0.0) ** 2 + (1.5 - 0.0) ** 2 + (0.0 - 3.0) ** 2) / 4
    assert loss.item() == pytest.approx(expected)


# -------------------------------------------------------------------------- inputs
def test_encoding_keeps_the_reply_and_cuts_context_from_the_left():
    from steer.apm import default_backbone
    from steer.modeling import load_tokenizer

    tok = load_tokenizer(default_backbone())
    template = PromptTemplate(get_schema("oasst"))
    long_context = "alpha " * 300 + "the final question"
    msgs = [{"role": "user", "content": long_context}, {"role": "assistant", "content": "a short reply here"}]
    enc = encode_for_apm(msgs, tok, template, max_length=64)
    assert len(enc["input_ids"]) == 64
    text = tok.decode(enc["input_ids"])
    assert "a short reply here" in text
    assert "the final question" in text  # the most recent context survives
    assert enc["token_type_ids"][-1] == 1 and enc["token_type_ids"][0] == 0
    # A reply longer than the window keeps its beginning and still some context.
    msgs[1]["content"] = "beginning " + "word " * 300
    enc = encode_for_apm(msgs, tok, template, max_length=64)
    text = tok.decode(enc["input_ids"])
    assert len(enc["input_ids"]) == 64 and "beginning" in text and "question" in text


# ------------------------------------------------------------------------ training
def test_training_changes_weights_and_saves_a_plain_hf_regression_model(trained_bert, tiny_bert):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    assert (trained_bert / "model.safetensors").is_file()
    assert not list(trained_bert.glob("*.bin"))
    model = AutoModelForSequenceClassification.from_pretrained(trained_bert)
    assert model.config.problem_type == "regression"
    assert model.config.num_labels == 3
    assert [model.config.id2label[i] for i in range(3)] == ["helpfulness", "humor", "creativity"]
    before = load_file(tiny_bert / "model.safetensors")
    after = model.state_dict()
    changed = [k for k, v in before.items() if f"bert.{k}" in after and not torch.equal(v, after[f"bert.{k}"])]
    assert len(changed) > len(before) // 2, "training left most backbone weights untouched"
    saved = json.loads((trained_bert / "steer_config.json").read_text())
    assert saved["kind"] == "apm" and saved["split"] == {"eval_fraction": 0.25, "seed": 0}
    assert len(saved["label_normalization"]["mean"]) == 3
    assert (trained_bert / "eval_results.json").is_file()
    # The model card gives the schema and the held-out numbers eval_results.json holds.
    card = (trained_bert / "README.md").read_text()
    evaluation = json.loads((trained_bert / "eval_results.json").read_text())
    assert "| `humor` | 0-4 |" in card
    assert f"mean Pearson {evaluation['mean_pearson']:.4g}" in card
    assert f"| `creativity` | {evaluation['attributes']['creativity']['pearson']:.4g} |" in card


def test_predictor_restores_schema_and_sorted_batches_match_unsorted(trained_bert, schema_file, data_file):
    from steer.data import load_conversations

    apm = AttributePredictor.load(trained_bert, device="cpu")
    assert apm.schema == get_schema(str(schema_file))
    convs, _ = load_conversations(data_file, "steer", schema=apm.schema)
    items = [c.messages for c in convs[:11]]
    items.append([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    sorted_preds = apm.predict(items, batch_size=3, sort_by_length=True)
    plain = apm.predict(items, batch_size=3, sort_by_length=False)
    one_by_one = np.stack([apm.predict([it], batch_size=1)[0] for it in items])
    assert sorted_preds.shape == (12, 3)
    np.testing.assert_allclose(sorted_preds, plain, atol=1e-4)
    np.testing.assert_allclose(sorted_preds, one_by_one, atol=1e-4)
    assert np.ptp(sorted_preds[:, 0]) > 0  # not one constant answer
    dicts = apm.predict_dicts(items[:2])
    assert list(dicts[0]) == ["helpfulness", "humor", "creativity"]
    assert dicts[1]["humor"] == pytest.approx(sorted_preds[1, 1], abs=1e-4)


def test_decoder_backbone_trains_and_predicts(workdir, data_file, tiny_gpt2, schema_file):
    out = workdir / "apm-gpt2"
    train_main(_config(data_file, out, tiny_gpt2, schema_file, max_steps=2, eval_fraction=0.0))
    apm = AttributePredictor.load(out, device="cpu")
    items = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x " * n}] for n in (1, 9, 4)]
    preds = apm.predict(items, batch_size=2)
    assert preds.shape == (3, 3) and np.isfinite(preds).all()
    # Right padding must not change a decoder's score (it pools the last real token).
    np.testing.assert_allclose(preds, np.stack([apm.predict([it])[0] for it in items]), atol=1e-4)


def test_lora_training_saves_a_merged_plain_model(workdir, data_file, tiny_bert, schema_file):
    from transformers import AutoModelForSequenceClassification

    out = workdir / "apm-lora"
    train_main(_config(data_file, out, tiny_bert, schema_file, max_steps=2, lora=True, eval_fraction=0.0))
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 3
    assert AttributePredictor.load(out).predict([[{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]]).shape == (1, 3)


def test_resume_continues_from_the_last_checkpoint(workdir, data_file, tiny_bert, schema_file, monkeypatch):
    import training.apm as apm_module

    out = workdir / "apm-resume"
    train_main(_config(data_file, out, tiny_bert, schema_file, max_steps=2, save_steps=2, eval_fraction=0.0))
    assert (out / "checkpoint-2").is_dir()
    with pytest.raises(ApmTrainError, match="--resume"):
        train_main(_config(data_file, out, tiny_bert, schema_file, max_steps=4, save_steps=2, eval_fraction=0.0))

    calls = []
    real = apm_module.masked_mse
    monkeypatch.setattr(apm_module, "masked_mse", lambda *a: calls.append(1) or real(*a))
    result = train_main(_config(data_file, out, tiny_bert, schema_file, max_steps=4, save_steps=2,
                                eval_fraction=0.0, resume=True))
    assert result["global_step"] == 4
    assert len(calls) == 2, "resume should run only the steps after the checkpoint"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


# ---------------------------------------------------------------------- evaluation
def test_eval_json_matches_a_direct_scipy_computation(trained_bert, data_file, capsys):
    from scipy import stats

    from steer.data import load_conversations
    from training.apm import rated_items

    metrics = eval_main(ApmEvalConfig(model=str(trained_bert), data=str(data_file), format="steer", all=True,
                                      json=True, device="cpu"))
    printed = json.loads(capsys.readouterr().out)
    assert printed["attributes"].keys() == {"helpfulness", "humor", "creativity"}
    apm = AttributePredictor.load(trained_bert, device="cpu")
    convs, _ = load_conversations(data_file, "steer", schema=apm.schema)
    items = rated_items(convs, apm.schema, use_scores=False)
    preds = apm.predict([it.messages for it in items])
    for j, name in enumerate(apm.schema.names):
        labelled = [(p[j], it.messages[-1].labels[name]) for p, it in zip(preds, items)
                    if name in it.messages[-1].labels]
        p, y = np.array(labelled).T
        got = printed["attributes"][name]
        assert got["n"] == len(y)
        assert got["pearson"] == pytest.approx(stats.pearsonr(p, y).statistic, abs=1e-4)
        assert got["spearman"] == pytest.approx(stats.spearmanr(p, y).statistic, abs=1e-4)
        assert got["mae"] == pytest.approx(np.abs(p - y).mean(), abs=1e-4)
    assert printed["mean_pearson"] == pytest.approx(np.mean([m["pearson"] for m in printed["attributes"].values()]))
    assert metrics["mean_pearson"] == pytest.approx(printed["mean_pearson"])

    # The default split is the held-out one recorded at training time: fewer items than --all.
    eval_main(ApmEvalConfig(model=str(trained_bert), data=str(data_file), format="steer", json=True))
    held_out = json.loads(capsys.readouterr().out)
    assert held_out["split"] == {"eval_fraction": 0.25, "seed": 0}
    assert 0 < held_out["n_items"] < printed["n_items"]


def test_metrics_report_null_for_constant_or_scarce_labels():
    schema = get_schema("helpsteer")
    preds = np.random.default_rng(0).normal(size=(6, 5))
    labels = np.full((6, 5), np.nan)
    labels[:, 0] = [0, 1, 2, 3, 4, 2]  # fine
    labels[:, 1] = 3  # constant
    labels[:2, 2] = [1, 2]  # too few
    m = attribute_metrics(preds, labels, schema)["attributes"]
    assert m["helpfulness"]["pearson"] is not None and m["helpfulness"]["n"] == 6
    assert m["correctness"]["pearson"] is None and m["correctness"]["mae"] is not None
    assert m["coherence"]["pearson"] is None and m["coherence"]["n"] == 2
    assert m["complexity"] == {"pearson": None, "spearman": None, "mae": None, "n": 0}


# --------------------------------------------------------------------------- errors
def _cli(argv, capsys):
    from steer.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_errors_are_one_line(tmp_path, capsys, data_file, tiny_bert):
    out = str(tmp_path / "out")
    code, err = _cli(["apm", "train", "--data", str(tmp_path / "missing.jsonl"), "--format", "steer",
                      "--output", out], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "missing.jsonl" in err

    code, err = _cli(["apm", "train", "--data", str(data_file), "--format", "nope", "--output", out], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "unknown format" in err

    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    code, err = _cli(["apm", "train", "--data", str(unlabelled), "--format", "steer", "--schema", "oasst",
                      "--output", out, "--backbone", str(tiny_bert)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "no assistant reply" in err

    code, err = _cli(["apm", "train", "--data", str(data_file), "--format", "steer", "--output", out,
                      "--backbone", str(tmp_path / "no-such-model")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and ("backbone" in err or "tokenizer" in err)

    code, err = _cli(["apm", "eval", "--model", str(tmp_path), "--data", str(data_file), "--format", "steer"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "steer_config.json" in err


def test_load_rejects_a_policy_directory(tmp_path):
    from steer.artifacts import save_steer_config

    save_steer_config(tmp_path, "policy", get_schema("oasst"))
    with pytest.raises(ArtifactError, match="not a 'apm'"):
        AttributePredictor.load(tmp_path)
