"""The attribute prediction model: loss masking, training on tiny backbones, saving/loading,
length-sorted prediction, resume, evaluation metrics and CLI errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from steer.models.apm import AttributePredictor, encode_for_apm
from steer.core.artifacts import ArtifactError
from steer.core.attributes import get_schema
from steer.core.template import PromptTemplate
from steer.training.apm import ApmTrainConfig, ApmTrainError, masked_mse
from steer.training.apm import main as train_main
from steer.training.apm_eval import ApmEvalConfig, attribute_metrics
from steer.training.apm_eval import main as eval_main

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

    from steer.models.apm import default_backbone
    from steer.models.modeling import load_tokenizer

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
    base = dict(data=str(data), output_dir=str(output), format="steer", schema=str(schema_file), backbone=str(backbone),
                max_length=64, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, eval_fraction=0.25,
                logging_steps=1,
                device="cpu", recipe="finetune")
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
    from steer.models.apm import default_backbone
    from steer.models.modeling import load_tokenizer

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
    assert f"mean Pearson over all attributes {evaluation['mean_pearson']:.4g}" in card
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
    import steer.training.apm as apm_module

    out = workdir / "apm-resume"
    train_main(_config(data_file, out, tiny_bert, schema_file, max_steps=2, save_steps=2, eval_fraction=0.0,
                       keep_checkpoints=True))
    assert (out / "checkpoint-2").is_dir()
    with pytest.raises(ApmTrainError, match="--resume"):
        train_main(_config(data_file, out, tiny_bert, schema_file, max_steps=4, save_steps=2, eval_fraction=0.0))

    calls = []
    real = apm_module.masked_mse
    monkeypatch.setattr(apm_module, "masked_mse", lambda *a: calls.append(1) or real(*a))
    result = train_main(_config(data_file, out, tiny_bert, schema_file, max_steps=4, save_steps=2,
                                eval_fraction=0.0, resume=True, keep_checkpoints=True))
    assert result["global_step"] == 4
    assert len(calls) == 2, "resume should run only the steps after the checkpoint"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # The APM carries the whole config of the run that finished it.
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["resume"] is True and saved["max_steps"] == 4 and saved["recipe"] == "finetune"
    assert saved["lr_scheduler_type"] == "linear" and saved["per_device_train_batch_size"] == 4


# ---------------------------------------------------------------------- evaluation
def test_eval_json_matches_a_direct_scipy_computation(trained_bert, data_file, capsys):
    from scipy import stats

    from steer.data import load_conversations
    from steer.training.apm import rated_items

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
    from steer.cli.main import main

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
    from steer.core.artifacts import save_steer_config

    save_steer_config(tmp_path, "policy", get_schema("oasst"))
    with pytest.raises(ArtifactError, match="not a 'apm'"):
        AttributePredictor.load(tmp_path)


# ------------------------------------------------------------------ cross-validation
def test_grouped_folds_keep_every_group_in_one_fold_and_stay_balanced():
    from steer.training.apm_cv import grouped_folds

    rng = np.random.default_rng(0)
    groups = [f"tree{g}" for g in rng.integers(0, 60, size=500)] + ["big"] * 40
    folds = grouped_folds(groups, 5, seed=3)
    fold_of = {}
    for g, f in zip(groups, folds):
        assert fold_of.setdefault(g, f) == f, f"group {g} is in two folds"
    sizes = np.bincount(folds, minlength=5)
    assert set(folds) == set(range(5)) and sizes.max() - sizes.min() <= 40
    np.testing.assert_array_equal(folds, grouped_folds(groups, 5, seed=3))  # reproducible
    with pytest.raises(ValueError, match="folds"):
        grouped_folds(["a", "b"], 3)


def test_out_of_fold_predicts_every_item_exactly_once_from_other_groups():
    from steer.training.apm_cv import grouped_folds, out_of_fold

    groups = np.array([f"g{i // 3}" for i in range(61)])
    folds = grouped_folds(groups, 4)
    seen = np.zeros(len(groups), dtype=int)

    def fit_predict(train, test):
        assert not set(groups[train]) & set(groups[test]), "a group is on both sides"
        assert len(train) + len(test) == len(groups)
        seen[test] += 1
        return np.repeat(test[:, None].astype(float), 2, axis=1)

    oof = out_of_fold(folds, fit_predict, 2)
    assert (seen == 1).all()
    np.testing.assert_array_equal(oof[:, 0], np.arange(len(groups)))


def _linear_data(n_groups=200, per_group=3, dim=10, r=0.7, seed=0):
    """Features and a target whose best linear prediction correlates ``r`` with it."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    x = rng.normal(size=(n, dim))
    w = rng.normal(size=dim)
    signal = x @ w
    noise = rng.normal(size=n) * signal.std() * np.sqrt(1 / r**2 - 1)
    groups = np.array([f"g{i // per_group}" for i in range(n)])
    return x, signal + noise, groups


def test_ridge_probe_recovers_a_known_linear_signal_with_an_interval_around_it():
    from steer.training.apm_cv import constant_baseline, grouped_folds, report, ridge_probe

    schema = get_schema("helpsteer")
    x, y, groups = _linear_data(r=0.7)
    targets = np.full((len(y), len(schema)), np.nan)
    targets[:, 0] = y
    targets[:, 1] = y + np.random.default_rng(1).normal(size=len(y)) * 100  # pure noise
    folds = grouped_folds(groups, 5)
    oof = ridge_probe(x, targets, groups, folds)
    r = report("probe", oof, targets, groups, folds, schema, ["helpfulness"], n_boot=200)
    helpful = r["attributes"]["helpfulness"]
    assert helpful["pearson"] == pytest.approx(0.7, abs=0.05)
    lo, hi = helpful["pearson_ci"]
    assert lo < 0.7 < hi and hi - lo < 0.15
    assert abs(r["attributes"]["correctness"]["pearson"]) < 0.2
    assert r["headline_pearson"] == pytest.approx(helpful["pearson"])
    assert len(r["folds"]["per_fold"]) == 5 and r["folds"]["std"] >= 0
    # The constant baseline predicts each fold with its training folds' mean.
    const = constant_baseline(targets, folds)
    for f in range(5):
        np.testing.assert_allclose(const[folds == f, 0], y[folds != f].mean())


def test_cv_runs_the_recipe_and_both_baselines_on_the_same_folds(workdir, data_file, tiny_bert, schema_file,
                                                               monkeypatch, capsys):
    import steer.training.apm_cv as apm_cv

    calls = []
    real = apm_cv.out_of_fold
    monkeypatch.setattr(apm_cv, "out_of_fold", lambda folds, fn, k: calls.append(folds.copy()) or real(folds, fn, k))
    out = workdir / "apm-cv"
    result = train_main(_config(data_file, out, tiny_bert, schema_file, recipe="head", cv=3, bootstrap=50,
                                eval_fraction=0.0))
    assert len(calls) == 3, "model, ridge probe and constant each cross-validated once"
    for folds in calls[1:]:
        np.testing.assert_array_equal(folds, calls[0])
    cv = json.loads((out / "cv_results.json").read_text())
    assert cv["folds"] == 3 and cv["n_items"] == 40
    for key in ("model", "ridge_probe", "constant"):
        assert set(cv[key]["attributes"]) == {"helpfulness", "humor", "creativity"}
        assert cv[key]["attributes"]["humor"]["n"] == 40
    assert cv["model"]["headline_pearson_ci"] is not None
    assert "3-fold CV over 20 conversation groups" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    ci = cv["model"]["headline_pearson_ci"]
    assert f"{cv['model']['headline_pearson']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" in card
    assert result["cv"]["model"]["headline_pearson"] == cv["model"]["headline_pearson"]


# ------------------------------------------------------------------ frozen backbone + head (default)
def test_default_recipe_saves_a_frozen_backbone_and_a_safetensors_head(workdir, data_file, tiny_bert, schema_file):
    from safetensors.numpy import load_file

    from steer.data import load_conversations
    from steer.training.apm_cv import apply_head

    out = workdir / "apm-head"
    cfg = _config(data_file, out, tiny_bert, schema_file, eval_fraction=0.25,
                  recipe=ApmTrainConfig.__dataclass_fields__["recipe"].default)
    assert cfg.recipe == "head"
    train_main(cfg)
    saved = json.loads((out / "steer_config.json").read_text())
    assert saved["head"]["type"] == "ridge" and saved["head"]["length_features"] is True
    head = load_file(out / "head.safetensors")
    assert head["weight"].shape[1] == 3 and not list(out.glob("*.bin")) and not list(out.glob("checkpoint-*"))
    apm = AttributePredictor.load(out, device="cpu")
    convs, _ = load_conversations(data_file, "steer", schema=apm.schema)
    items = [c.messages for c in convs[:9]]
    preds = apm.predict(items, batch_size=4)
    np.testing.assert_allclose(preds, apm.predict(items, batch_size=2, sort_by_length=False), atol=1e-4)
    np.testing.assert_allclose(preds, apply_head({k: v.astype(np.float64) for k, v in head.items()},
                                                 apm.features(items)), atol=1e-4)
    assert np.ptp(preds[:, 0]) > 0
    # The head recipe cross-validates by default (it reuses the backbone pass), and the card quotes it.
    cv = json.loads((out / "cv_results.json").read_text())
    assert cv["folds"] == 5 and "5-fold cross-validation" in (out / "README.md").read_text()
    # The backbone is saved unchanged: same weights as the one it started from.
    from safetensors.torch import load_file as load_torch

    before, after = load_torch(tiny_bert / "model.safetensors"), load_torch(out / "model.safetensors")
    shared = [k for k in before if k in after]
    assert shared and all(torch.equal(before[k], after[k]) for k in shared)


# ------------------------------------------------------------------ issue 17: messages and defaults
def test_cv_on_too_few_groups_is_a_clear_error_or_skipped_by_default(workdir, tiny_bert, schema_file):
    data = _write_data(workdir / "few.jsonl", n=6, seed=2)  # 3 groups
    with pytest.raises(ApmTrainError, match="--cv 5 needs at least 5 conversation groups"):
        train_main(_config(data, workdir / "apm-few", tiny_bert, schema_file, recipe="head", cv=5, eval_fraction=0.0))
    result = train_main(_config(data, workdir / "apm-few", tiny_bert, schema_file, recipe="head", eval_fraction=0.0))
    assert "cv" not in result and (workdir / "apm-few" / "head.safetensors").is_file()


def test_held_out_headline_names_its_attributes_and_n_and_warns_when_small():
    from steer.training.apm import held_out_summary

    schema = get_schema("oasst")
    metrics = {"n_items": 95, "attributes": {n: {"pearson": 0.5} for n in schema.names}}
    text = held_out_summary(metrics, schema, 14)
    assert "quality, helpfulness, humor, creativity: 0.500" in text
    assert "n = 95 rated replies from 14 conversation groups" in text
    assert "not meaningful" in text and "--cv" in text
    assert "not meaningful" not in held_out_summary({**metrics, "n_items": 400}, schema, 60)
    assert "quote the cross-validated figure above" in held_out_summary(metrics, schema, 14, cross_validated=True)


def test_eval_defaults_to_the_format_the_apm_was_trained_on(shared_path, tiny_apm_dir, capsys):

    metrics = eval_main(ApmEvalConfig(model=str(tiny_apm_dir), data=str(shared_path("data", "helpsteer2",
                                                                                        "sample.jsonl")),
                                      all=True, json=True, device="cpu"))
    assert metrics["format"] == "helpsteer" and metrics["n_items"] == 100
    assert "malformed" not in capsys.readouterr().err


def test_finetune_is_quiet_and_deletes_its_checkpoints_unless_kept(workdir, tiny_bert, schema_file, capfd):
    data = _write_data(workdir / "long.jsonl", n=12, seed=1)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["messages"][-1]["content"] = "dragon " * 700  # longer than the tokenizer's 512
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = workdir / "apm-quiet"
    train_main(_config(data, out, tiny_bert, schema_file, max_steps=2, save_steps=1, eval_fraction=0.0))
    err = capfd.readouterr().err
    for noise in ("Token indices sequence length", "pin_memory", "LOAD REPORT", "were not sharded", "Loading weights"):
        assert noise not in err
    assert not list(out.glob("checkpoint-*")) and (out / "model.safetensors").is_file()
    help_text = ApmTrainConfig.__dataclass_fields__["keep_checkpoints"].metadata["help"]
    assert "deleted" in help_text and "steer sft" in help_text


@pytest.mark.parametrize("command", ["train", "cv", "eval"])
def test_apm_help_renders_and_states_the_checkpoint_policy(command, capsys):
    from steer.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["apm", command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    if command == "train":
        assert "--keep_checkpoints" in out and "deleted once the final model is saved" in out
        assert "--recipe" in out and "--cv" in out
    if command == "eval":
        assert "the format the APM was trained on" in out


def test_paired_difference_is_positive_for_a_better_model_and_zero_for_the_same():
    from steer.training.apm_cv import paired_difference

    schema = get_schema("helpsteer")
    x, y, groups = _linear_data(r=0.9)
    labels = np.full((len(y), len(schema)), np.nan)
    labels[:, 0] = y
    good = np.zeros_like(labels)
    good[:, 0] = y + np.random.default_rng(2).normal(size=len(y)) * y.std() * 0.3
    poor = np.zeros_like(labels)
    poor[:, 0] = y + np.random.default_rng(3).normal(size=len(y)) * y.std() * 3
    d = paired_difference(good, poor, labels, groups, schema, ["helpfulness"], n_boot=200)
    assert d["difference"] > 0.3 and d["ci"][0] > 0
    same = paired_difference(good, good, labels, groups, schema, ["helpfulness"], n_boot=50)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]


def _rated_means(true_sd: float, rater_sd: float, n: int = 3000, seed: int = 1):
    rng = np.random.default_rng(seed)
    truth = rng.normal(0.5, true_sd, n)
    counts = rng.choice([1, 2, 3, 4], n, p=[0.2, 0.2, 0.4, 0.2])
    means = np.array([truth[i] + rng.normal(0, rater_sd, counts[i]).mean() for i in range(n)])
    return truth, means, counts, [f"tree{i // 5}" for i in range(n)]


@pytest.mark.parametrize("true_sd, rater_sd", [(0.2, 0.3), (0.1, 0.4)])
def test_noise_ceiling_matches_a_perfect_models_correlation_on_simulated_raters(true_sd, rater_sd):
    from steer.training.apm_cv import rater_noise_ceiling

    truth, means, counts, groups = _rated_means(true_sd, rater_sd)
    r = rater_noise_ceiling(means, counts, groups, n_boot=200)
    perfect = np.corrcoef(truth, means)[0, 1]
    assert r["ceiling"] == pytest.approx(perfect, abs=0.05)
    assert r["ci"][0] < perfect < r["ci"][1]
    assert r["true_variance"] == pytest.approx(true_sd**2, rel=0.25)
    assert r["rater_variance"] == pytest.approx(rater_sd**2, rel=0.25)
    assert r["strata"] == {k: int((counts == k).sum()) for k in (1, 2, 3, 4)}


def test_noise_ceiling_is_not_identifiable_from_one_number_of_raters():
    from steer.training.apm_cv import rater_noise_ceiling

    _, means, _, groups = _rated_means(0.2, 0.3, n=300)
    r = rater_noise_ceiling(means, np.full(300, 3), groups, n_boot=20)
    assert r["ceiling"] is None and r["ci"] is None and r["strata"] == {3: 300}
