"""``steer eval steerability``: the metrics on hand-made inputs, and a small end-to-end run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from steer.training.steerability_metrics import attribute_metrics, crosstalk, level_means

LEVELS = [0, 1, 2, 3, 4]


def _grid(prompts: int = 6, draws: int = 2):
    requested = np.array([v for v in LEVELS for _ in range(prompts) for _ in range(draws)], dtype=float)
    groups = np.array([p for _ in LEVELS for p in range(prompts) for _ in range(draws)])
    return requested, groups


def test_a_perfectly_steerable_policy():
    requested, groups = _grid()
    m = attribute_metrics(requested, requested.copy(), groups, LEVELS, n_boot=200)
    assert m["spearman"] == 1.0 and m["pearson"] == 1.0
    assert m["monotonic"] is True and m["within_1"] == 1.0 and m["mean_abs_error"] == 0.0
    assert [lv["mean"] for lv in m["levels"]] == LEVELS
    assert all(lv["ci95"] == [lv["mean"], lv["mean"]] for lv in m["levels"])  # no spread, no interval
    assert m["n"] == len(requested)


def test_a_policy_that_ignores_the_request():
    requested, groups = _grid()
    m = attribute_metrics(requested, np.full_like(requested, 2.0), groups, LEVELS, n_boot=200)
    assert m["spearman"] is None and m["pearson"] is None  # undefined, not "0"
    assert m["monotonic"] is False
    assert m["within_1"] == pytest.approx(3 / 5)  # levels 1, 2, 3 are within 1 of 2
    assert all(lv["mean"] == 2.0 for lv in m["levels"])


def test_a_reversed_policy():
    requested, groups = _grid()
    m = attribute_metrics(requested, 4 - requested, groups, LEVELS, n_boot=200)
    assert m["spearman"] == -1.0 and m["pearson"] == -1.0
    assert m["monotonic"] is False
    # |(4 - v) - v| = |4 - 2v| is 4, 2, 0, 2, 4: only level 2 is within 1.
    assert m["within_1"] == pytest.approx(1 / 5)
    assert [lv["mean"] for lv in m["levels"]] == [4, 3, 2, 1, 0]


def test_the_bootstrap_interval_resamples_prompts():
    # Level 0: prompt 0 always measures 0, prompt 1 always 2 (two draws each). The mean is 1; a
    # bootstrap over prompts can only give 0, 1 or 2, so the interval spans [0, 2] almost surely.
    out = level_means([0], [0, 0, 0, 0], [0, 0, 2, 2], [0, 0, 1, 1], n_boot=2000, seed=1)[0]
    assert out["mean"] == 1.0 and out["n"] == 4
    assert out["ci95"] == [0.0, 2.0]
    # One prompt only: every resample is the same prompt, the interval collapses on the mean.
    assert level_means([0], [0, 0], [1.0, 3.0], [5, 5], n_boot=100)[0]["ci95"] == [2.0, 2.0]


def test_the_lead_over_the_baseline_has_a_paired_interval_that_tells_a_real_lead_from_noise():
    from steer.training.steerability_metrics import spearman_difference, spearman_interval

    rng = np.random.default_rng(0)
    requested, groups = _grid(prompts=12, draws=1)
    follows = requested + rng.normal(0, 0.7, len(requested))  # a policy that follows the request
    noise_a, noise_b = rng.normal(0, 1, len(requested)), rng.normal(0, 1, len(requested))  # two that ignore it
    lead = spearman_difference(requested, follows, noise_a, groups, n_boot=500, seed=1)
    assert lead["difference"] > 0.6 and lead["ci95"][0] > 0.3  # clear of 0
    tie = spearman_difference(requested, noise_a, noise_b, groups, n_boot=500, seed=1)
    assert tie["ci95"][0] < 0 < tie["ci95"][1]  # 60 replies cannot tell two ignoring policies apart
    # The interval of one Spearman contains it, and a larger grid narrows it.
    lo, hi = spearman_interval(requested, follows, groups, n_boot=500, seed=1)
    assert lo < attribute_metrics(requested, follows, groups, LEVELS, n_boot=0)["spearman"] < hi
    big_req, big_groups = _grid(prompts=48, draws=1)
    big_lo, big_hi = spearman_interval(big_req, big_req + rng.normal(0, 0.7, len(big_req)), big_groups, n_boot=500)
    assert big_hi - big_lo < hi - lo
    # Undefined on a constant judge, as the Spearman itself is.
    assert spearman_difference(requested, np.ones_like(requested), noise_a, groups, n_boot=50)["difference"] is None


def test_crosstalk_separates_the_varied_attribute_from_the_others():
    requested, _ = _grid()
    rng = np.random.default_rng(0)
    ct = crosstalk({"humor": (requested, {"humor": requested + rng.normal(0, 0.1, len(requested)),
                                         "creativity": 4 - requested, "helpfulness": np.full_like(requested, 3)})})
    assert ct["humor"]["humor"] > 0.95
    assert ct["humor"]["creativity"] == -1.0
    assert ct["humor"]["helpfulness"] is None


# ------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def eval_run(build_tiny_apm, build_tiny_policy, tmp_path_factory):
    """A tiny random policy, two tiny random judges and the prompt baseline on the policy's base
    (no chat template: the fallback layout)."""
    from steer.training.steerability import SteerabilityConfig, main

    root = tmp_path_factory.mktemp("steerability")
    policy = build_tiny_policy(root / "policy")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the base alone, as the baseline loads it
        shutil.copy(policy / name, policy / "base" / name)
    judge1 = build_tiny_apm(root / "apm1")
    judge2 = build_tiny_apm(root / "apm2")
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "Can you fix my sword?"}\n'
                       '{"id": "inn", "system": "You are an innkeeper.", "prompt": "A room, please."}\n'
                       '{"messages": [{"role": "user", "content": "Any news?"}]}\n')
    config = SteerabilityConfig(policy=str(policy), apm=[str(judge1), str(judge2)], output=str(root / "out"),
                                prompts=str(prompts), attributes="humor,creativity", values="0,2,4", samples=2,
                                best_of="1,3", max_new_tokens=6, seed=3, baseline="prompt",
                                base_model=str(policy / "base"), batch_size=16, bootstrap=100, device="cpu")
    assert main(config) == 0
    return config, root / "out"


def test_report_files_and_plots_exist_and_parse(eval_run):
    config, out = eval_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["steerability"]) == {"humor", "creativity"}
    for block in report["steerability"].values():
        assert {"spearman", "pearson", "levels", "monotonic", "within_1"} <= set(block)
        assert [lv["requested"] for lv in block["levels"]] == [0, 2, 4]
        assert all(lv["n"] == 3 * 2 for lv in block["levels"])  # 3 prompts x 2 draws
    assert set(report["best_of"]) == {"1", "3"}
    assert report["steerability"] == report["best_of"]["3"]["steerability"]
    assert set(report["crosstalk"]) == {"humor", "creativity"}
    assert set(report["crosstalk"]["humor"]) == {"humor", "creativity"}
    assert set(report["baseline"]["steerability"]) == {"humor", "creativity"}
    assert [j["apm"] for j in report["judges"]] == config.apm
    assert report["judges"][0]["steerability"] == report["steerability"]
    assert report["judges"][0]["baseline"]["steerability"] == report["baseline"]["steerability"]
    assert "no chat template" in report["settings"]["baseline_prompt"]
    for judge in report["judges"]:  # the policy's lead over the baseline, paired on the same cells
        for n in ("1", "3"):
            gaps = judge["best_of"][n]["vs_baseline"]
            assert set(gaps) == {"humor", "creativity"}
            for a, gap in gaps.items():
                policy, base = judge["best_of"][n]["steerability"][a]["spearman"], judge["baseline"]["steerability"][a]["spearman"]
                if policy is not None and base is not None:
                    assert gap["difference"] == pytest.approx(policy - base, abs=2e-4)
    assert report["settings"]["replies_generated"] == 2 * 3 * 3 * 2 * 3 + 2 * 3 * 3 * 2
    for lv in report["relevance"]["humor"]["levels"]:
        assert -1.0 <= lv["mean"] <= 1.0
    md = (out / "report.md").read_text()
    assert "| humor | policy best-of-3 |" in md and "prompt baseline" in md
    assert report["plots"] == ["steerability.png", "steerability-judge-2.png", "crosstalk.png"]
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
        import matplotlib.image

        assert matplotlib.image.imread(out / name).shape[0] > 100


def test_a_policy_trained_on_label_words_is_compared_with_a_baseline_asked_in_those_words(
        build_tiny_apm, build_tiny_policy, tmp_path):
    from steer.core.attributes import LEVEL_WORDS
    from steer.training.steerability import SteerabilityConfig, main

    policy = build_tiny_policy(tmp_path / "policy")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(policy / name, policy / "base" / name)
    saved = json.loads((policy / "steer_config.json").read_text())
    for attr in saved["schema"]["attributes"]:
        attr["levels"] = list(LEVEL_WORDS[attr["name"]])
    saved["template"] = {**(saved.get("template") or {"type": "steerlm"}), "label_wording": "words"}
    (policy / "steer_config.json").write_text(json.dumps(saved))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Can you fix my sword?"}\n')
    out = tmp_path / "out"
    assert main(SteerabilityConfig(policy=str(policy), apm=[str(build_tiny_apm(tmp_path / "apm"))], output=str(out),
                                   prompts=str(prompts), attributes="humor", values="0,4", samples=1, best_of="1",
                                   max_new_tokens=4, baseline="prompt", base_model=str(policy / "base"),
                                   bootstrap=10, device="cpu")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["baseline_prompt"].endswith("values in words")
    cached = [json.loads(line) for p in (out / "cache").glob("baseline-prompt-*-words.generations.jsonl")
              for line in p.read_text().splitlines()]
    assert len(cached) == 2


def test_a_rerun_reuses_the_cache_and_reproduces_the_report(eval_run, monkeypatch):
    from steer.runtime.generator import SteerGenerator
    from steer.training.steerability import main

    config, out = eval_run
    before = json.loads((out / "report.json").read_text())
    sizes = {p.name: p.stat().st_size for p in (out / "cache").iterdir()}

    def no_decoding(self, rows, **kwargs):
        assert not rows, "a rerun with the same settings must not generate again"
        return []

    monkeypatch.setattr(SteerGenerator, "generate_prepared", no_decoding)
    assert main(config) == 0
    after = json.loads((out / "report.json").read_text())
    assert {p.name: p.stat().st_size for p in (out / "cache").iterdir()} == sizes
    for key in ("steerability", "best_of", "baseline", "crosstalk", "judges", "relevance"):
        assert after[key] == before[key]


def test_best_of_in_the_eval_is_what_the_api_picks(eval_run):
    """The eval's best-of-3 winner for a cell is the reply SteerGenerator(best_of=3) returns."""
    from steer.models.apm import AttributePredictor
    from steer.runtime.generator import SteerGenerator
    from steer.training.steerability import SEED_STRIDE, load_prompts

    config, out = eval_run
    report = json.loads((out / "report.json").read_text())
    prompts = load_prompts(config.prompts)
    gen = SteerGenerator.load(config.policy, device="cpu", apm=AttributePredictor.load(config.apm[0]))
    # Prompt 0, draw 0, humor requested 4: seed = base seed + 64 * 0.
    result = gen.generate(list(prompts[0].messages), {"humor": 4}, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_p=config.top_p, seed=config.seed, best_of=3)
    assert SEED_STRIDE == 64
    example = [e for e in report["examples"] if e["attribute"] == "humor" and e["requested"] == 4][0]
    assert example["reply"] == result.text


def test_bad_settings_name_the_option(tmp_path, capsys):
    from steer.cli.main import main as cli

    assert cli(["eval", "steerability", "--policy", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "[apm]" in capsys.readouterr().err
    assert cli(["eval", "steerability", "--policy", str(tmp_path), "--apm", "x", "--output", str(tmp_path),
                "--baseline", "prompt"]) == 2
    assert "[base_model]" in capsys.readouterr().err
    assert cli(["eval", "steerability", "--policy", str(tmp_path), "--apm", "x", "--output", str(tmp_path),
                "--best-of", "1,x"]) == 2
    assert "[best_of]" in capsys.readouterr().err
    for command in ("steerability", "preference"):
        with pytest.raises(SystemExit) as e:
            cli(["eval", command, "--help"])
        assert e.value.code == 0 and "--apm" in capsys.readouterr().out


def test_prompt_baseline_writes_the_values_as_instructions(demo_schema, gpt2_tokenizer):
    import copy

    from steer.training.prompt_baseline import InstructionPrompt, instruction

    assert instruction(demo_schema, "humor", 4) == "Humor: 4 of 4, be very funny."
    assert instruction(demo_schema, "humor", 0) == "Humor: 0 of 4, do not be funny at all."
    messages = [{"role": "system", "content": "You are Brom."}, {"role": "user", "content": "Fix my sword?"}]

    # A tokenizer with a chat template: the base model's own template renders the turns.
    tok = copy.deepcopy(gpt2_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = InstructionPrompt(demo_schema, tok)
    text = "".join(s.text for s in prompt.render(messages, attributes={"humor": 4}))
    assert text.startswith("<|system|>You are Brom.\nWrite your reply with these qualities. Helpfulness: 3 of 4")
    assert "Humor: 4 of 4, be very funny." in text and text.endswith("<|user|>Fix my sword?\n<|assistant|>")
    assert prompt.stop_strings == [tok.eos_token]
    ids = prompt.tokenize(messages, tok, attributes={"humor": 4}).input_ids
    assert tok.decode(ids) == text

    # Without one: steer's turn layout, no label line, the instructions in the system turn.
    plain = InstructionPrompt(demo_schema, gpt2_tokenizer)
    text = "".join(s.text for s in plain.render(messages, attributes={"creativity": 0}))
    assert "<extra_id_2>" not in text and text.endswith("<extra_id_1>Assistant\n")
    assert "Creativity: 0 of 4, do not be creative at all." in text
    assert "no chat template" in plain.description

    # A policy trained with --label-wording words is compared with a baseline asked in the same words.
    from steer.training.demo.pipeline import demo_schema as bundled_demo_schema

    worded = InstructionPrompt(bundled_demo_schema(), tok, wording="words")
    text = "".join(s.text for s in worded.render(messages, attributes={"humor": 4, "creativity": 0}))
    assert ("<|system|>You are Brom.\nReply in a way that is as helpful and specific as possible, hilarious and over "
            "the top, plain and literal.\n") in text
    assert worded.description == "chat template, values in words"
