import json

import pytest
import torch

from steer.core.artifacts import load_steer_config
from steer.core.attributes import get_schema
from steer.core.conversation import Message
from steer.models.modeling import ModelLoadError
from steer.core.template import IGNORE_INDEX, PromptTemplate
from steer.training.train_args import TRAINING_CONFIG_FILE
from steer.training.sft import (
    ContrastPicker,
    SftCollator,
    SftConfig,
    SftError,
    default_target_modules,
    main,
    tokenize_conversations,
)

SCHEMA = get_schema("oasst")


def test_collator_masks_padding_and_prompt(sft_conversations, llama_tokenizer):
    template = PromptTemplate(SCHEMA)
    convs = sft_conversations(4)
    examples = tokenize_conversations(convs, template, llama_tokenizer, max_length=512)
    batch = SftCollator(llama_tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    )
    lengths = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, (conv, n) in enumerate(zip(convs, lengths)):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        assert mask[:n].all() and not mask[n:].any()
        assert (labels[n:] == IGNORE_INDEX).all()
        assert (ids[n:] == llama_tokenizer.pad_token_id).all()
        trained = labels[:n] != IGNORE_INDEX
        assert (labels[:n][trained] == ids[:n][trained]).all()
        # Exactly the assistant replies + end markers are trained; the prompt (system, user,
        # label line) is not.
        replies = [m.content + template.end_marker for m in conv.messages if m.role == "assistant"]
        trained_text = llama_tokenizer.decode(ids[:n][trained].tolist())
        assert trained_text.replace(" ", "") == "".join(replies).replace(" ", "")
        assert "User" not in trained_text and "humor:" not in trained_text
        segments = template.render(conv.messages, "train")
        first = next(i for i, seg in enumerate(segments) if seg.trainable)
        prompt_len = 1 + sum(len(llama_tokenizer(seg.text, add_special_tokens=False)["input_ids"])
                             for seg in segments[:first])
        assert not trained[:prompt_len].any() and trained[prompt_len]


def test_default_target_modules_per_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert default_target_modules(llama) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert default_target_modules(gpt2) == ["c_attn", "c_proj", "c_fc"]

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)
            self.lm_head = torch.nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.lm_head

    assert default_target_modules(Odd()) == ["mix"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_load_in_4bit_without_cuda_fails_at_once(tmp_path, capsys):
    """The CUDA check comes first: the missing data file and the unknown base model are never
    reached (either would be a different error)."""
    cfg = SftConfig(base_model="does/not-matter", data=str(tmp_path / "missing.jsonl"), output_dir=str(tmp_path / "o"),
                    load_in_4bit=True)
    with pytest.raises(ModelLoadError, match="CUDA"):
        main(cfg)
    from steer.cli.main import main as cli

    code = cli(["sft", "--base-model", "x", "--data", "y", "--output", str(tmp_path / "o"), "--load-in-4bit"])
    assert code == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lora_steps_change_only_adapter_and_write_policy(sft_conversations, write_conversations, tiny_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from steer.models.modeling import load_causal_lm, quiet_peft_deprecations
    from steer.models.policy import load_policy

    data = write_conversations(tmp_path / "train.jsonl", sft_conversations(24))
    out = tmp_path / "policy"
    metrics = main(SftConfig(base_model=str(tiny_base), data=str(data), output_dir=str(out), max_steps=3,
                             per_device_train_batch_size=4,
                             learning_rate=1e-2, eval_fraction=0.2, logging_steps=1, merge=True))
    assert metrics["global_step"] == 3
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero; training must move it"
    config, schema = load_steer_config(out, kind="policy")
    assert schema.names == ["quality", "humor"]  # inferred from the labels the data uses
    assert config["adapter"] == "." and config["merged"] == "merged"
    assert config["base_model"] == str(tiny_base.resolve())
    assert not (out / "checkpoints").exists()
    # The model card says what the policy needs (schema, the exact prompt format) instead of PEFT's blank template.
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card
    assert "| `quality` | 0-4 |" in card and "| `humor` | 0-4 |" in card
    template = PromptTemplate(schema)
    rendered = template.render_text([Message("user", "Can you fix my sword?")], mode="inference",
                                    attributes={"quality": 4, "humor": schema["humor"].default})
    assert f"```\n{rendered}\n```" in card
    assert f"| eval_loss_after | {metrics['eval_loss_after']:.4g} |" in card
    # The adapter loads with plain PEFT and changes the base's outputs.
    base = load_causal_lm(tiny_base, device="cpu")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        with quiet_peft_deprecations():  # plain PEFT on purpose: the adapter must not need steer to load
            peft_model = PeftModel.from_pretrained(load_causal_lm(tiny_base, device="cpu"), str(out))
        peft_logits = peft_model(input_ids=ids).logits
        merged_logits = load_causal_lm(out / "merged", device="cpu")(input_ids=ids).logits
        policy_logits = load_policy(out, use_merged=False).model(input_ids=ids).logits
    assert not torch.allclose(before, peft_logits)
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(peft_logits, policy_logits, atol=1e-4, rtol=1e-4)


def test_trained_embeddings_stay_tied_to_the_output_head(sft_conversations, write_conversations, tiny_base, tmp_path):
    import warnings

    from steer.models.modeling import load_causal_lm
    from steer.models.policy import load_policy

    data = write_conversations(tmp_path / "train.jsonl", sft_conversations(24))
    out = tmp_path / "policy"
    main(SftConfig(base_model=str(tiny_base), data=str(data), output_dir=str(out), max_steps=3,
                   per_device_train_batch_size=4, learning_rate=1e-2,
                   eval_fraction=0.2, lora_modules_to_save=["embed_tokens"], merge=True))
    assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_policy(out, use_merged=False).model
    assert not [w for w in caught if "tie" in str(w.message) or "checkpointing" in str(w.message)], \
        [str(w.message) for w in caught]
    base_embedding = load_causal_lm(tiny_base, device="cpu").get_input_embeddings().weight
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert not torch.allclose(embedding, base_embedding), "training must move the embedding"
    # The output head is the trained matrix too, in the adapter and in the merged copy.
    torch.testing.assert_close(head, embedding)
    merged = load_causal_lm(out / "merged", device="cpu")
    torch.testing.assert_close(merged.get_output_embeddings().weight, embedding)


def test_gradient_checkpointing_trains_without_reentrant_or_deprecation_warnings(sft_conversations, write_conversations, tiny_base, tmp_path):
    import warnings

    data = write_conversations(tmp_path / "train.jsonl", sft_conversations(24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = main(SftConfig(base_model=str(tiny_base), data=str(data), output_dir=str(tmp_path / "policy"),
                                 max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, eval_fraction=0.2,
                                 gradient_checkpointing=True))
    assert metrics["global_step"] == 3
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # Neither torch's call for an explicit choice nor transformers' deprecation of the old name.
    assert not [w for w in caught if "use_reentrant" in str(w.message) or "gradient_checkpointing_enable" in str(w.message)]


def test_resume_after_kill(sft_conversations, write_conversations, tiny_base, tmp_path, monkeypatch):
    from transformers import Trainer

    data = write_conversations(tmp_path / "train.jsonl", sft_conversations(24))
    out = tmp_path / "policy"
    cfg = dict(base_model=str(tiny_base), data=str(data), output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
               save_steps=2, eval_fraction=0.0, logging_steps=1)
    original = Trainer.training_step
    calls = {"n": 0}

    def dies_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(SftConfig(**cfg))
    monkeypatch.setattr(Trainer, "training_step", original)
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert not (out / "steer_config.json").exists()
    with pytest.raises(SftError, match="--resume"):
        main(SftConfig(**cfg))
    counting = {"n": 0}

    def counted(self, *args, **kwargs):
        counting["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counted)
    metrics = main(SftConfig(**cfg, resume=True))
    assert metrics["global_step"] == 4
    assert counting["n"] == 2, "resuming must run only the steps after the checkpoint"
    assert (out / "adapter_model.safetensors").exists()
    saved = json.loads((out / "training_config.json").read_text())  # the whole config, beside the policy
    assert saved["resume"] is True and saved["save_steps"] == 2 and saved["lora_r"] == 16
    assert saved["lr_scheduler_type"] == "cosine" and saved["output_dir"] == str(out)


def test_bad_config_is_a_clear_error(tiny_base, tmp_path):
    with pytest.raises(SftError) as e:
        main(SftConfig(base_model=str(tiny_base), data=str(tmp_path / "nope.jsonl"), output_dir=str(tmp_path / "o")))
    assert e.value.field == "data"
    with pytest.raises(SftError) as e:
        main(SftConfig(base_model=str(tiny_base), data="x", output_dir="y", eval_fraction=1.5))
    assert e.value.field == "eval_fraction"
    for bad in ({"label_contrast": -1.0}, {"label_contrast_margin": 0.0}, {"label_contrast_mirror": "some"},
                {"label_wording": "adjectives"}):
        with pytest.raises(SftError) as e:
            SftConfig(base_model="b", data="x", output_dir="y", **bad)
        assert e.value.field == next(iter(bad))


def test_label_words_train_into_a_policy_that_is_prompted_with_them(sft_conversations, write_conversations, tiny_base,
                                                                     tmp_path):
    """``--label-wording words``: the policy records the wording, reloads with it, and its model
    card shows the prompt with the words; a schema without level words is refused up front."""
    from steer.models.policy import load_policy

    data = write_conversations(tmp_path / "train.jsonl", sft_conversations(16))
    out = tmp_path / "policy"
    main(SftConfig(base_model=str(tiny_base), data=str(data), output_dir=str(out), max_steps=2,
                   per_device_train_batch_size=4, eval_fraction=0.25, label_wording="words"))
    policy = load_policy(out, device="cpu")
    assert policy.config["template"]["label_wording"] == "words"
    line = policy.template.label_line({"quality": 2, "humor": 4})
    assert line == "<extra_id_2>(fair; hilarious and over the top)\n"
    assert "<extra_id_2>(excellent; completely serious)\n" in (out / "README.md").read_text()  # at the defaults
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"attributes": ["quality", "humor"]}))
    with pytest.raises(SftError, match="quality, humor has none") as e:
        main(SftConfig(base_model=str(tiny_base), data=str(data), output_dir=str(tmp_path / "p2"), max_steps=1,
                       schema=str(schema_file), label_wording="words"))
    assert e.value.field == "label_wording"


def test_stories260k_sft_lowers_heldout_loss_and_changes_outputs(shared_path, tmp_path):
    """Real pretrained tiny Llama, attribute-labelled NPC dialogue: a short LoRA SFT."""

    from steer.demo_data import rated_path
    from steer.models.modeling import load_causal_lm
    from steer.models.policy import load_policy

    base = shared_path("models", "stories260K")
    out = tmp_path / "policy"
    metrics = main(SftConfig(base_model=str(base), data=str(rated_path()), output_dir=str(out), limit=160,
                             num_train_epochs=1,
                             learning_rate=5e-3, per_device_train_batch_size=16, max_length=128, eval_fraction=0.2,
                             logging_steps=5))
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.3, metrics
    policy = load_policy(out, device="cpu")
    assert policy.schema.names == ["humor", "creativity", "helpfulness"]
    ids = policy.template.tokenize([{"role": "user", "content": "Can you fix my sword?"}], policy.tokenizer,
                                   "inference", {"humor": 4}).input_ids
    with torch.no_grad():
        tuned = policy.model(input_ids=torch.tensor([ids])).logits
        plain_model = load_causal_lm(base, device="cpu")
        plain_model.resize_token_embeddings(len(policy.tokenizer))  # sft added the template's markers
        plain = plain_model(input_ids=torch.tensor([ids])).logits
    assert (tuned - plain).abs().max() > 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_steps_on_half_billion_shaped_model(sft_conversations, write_conversations, tmp_path):
    """QLoRA on a randomly initialised ~0.5B-shaped Qwen2 config: memory stays small, loss drops."""
    pytest.importorskip("bitsandbytes")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from steer.training.demo.tiny_model import train_tokenizer

    template = PromptTemplate(SCHEMA)
    convs = sft_conversations(64)
    tok = train_tokenizer([template.render_text(c.messages) for c in convs], vocab_size=1000)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base_dir = tmp_path / "qwen-0.5b-shaped"
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    data = write_conversations(tmp_path / "train.jsonl", convs)
    torch.cuda.reset_peak_memory_stats()
    metrics = main(SftConfig(base_model=str(base_dir), data=str(data), output_dir=str(tmp_path / "policy"),
                             load_in_4bit=True, max_steps=12, per_device_train_batch_size=8, learning_rate=2e-3,
                             eval_fraction=0.25,
                             gradient_checkpointing=True, logging_steps=1))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"QLoRA peak GPU memory: {peak_gib:.2f} GiB; eval loss {metrics['eval_loss_before']:.3f} -> "
          f"{metrics['eval_loss_after']:.3f}")
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert peak_gib < 4.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_on_smollm2_lowers_the_loss_in_little_gpu_memory(shared_path, tmp_path):
    """Issue 15's QLoRA check: SmolLM2-135M-Instruct from its GGUF file, de-quantised and loaded in
    4 bits through bitsandbytes, a few LoRA steps on the demo's rated NPC dialogue."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gguf")
    from steer.demo_data import rated_path

    base = shared_path("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.cuda.reset_peak_memory_stats()
    metrics = main(SftConfig(base_model=str(base), data=str(rated_path()), format="steer",
                             output_dir=str(tmp_path / "policy"), template="chat_template", label_placement="reply",
                             load_in_4bit=True, limit=400, max_steps=20, per_device_train_batch_size=8,
                             learning_rate=4e-4, max_length=192, eval_fraction=0.1, logging_steps=5))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"SmolLM2 QLoRA: peak GPU memory {peak_gib:.2f} GiB; eval loss {metrics['eval_loss_before']:.3f} -> "
          f"{metrics['eval_loss_after']:.3f}; {metrics['train_seconds']:.1f} s for 20 steps")
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert peak_gib < 4.0


def test_mirrored_labels_flip_every_value_on_its_scale_and_keep_the_text(sft_conversations):
    from steer.training.sft import mirror_labels

    schema = get_schema("oasst")
    convs = sft_conversations(6)
    mirrored = mirror_labels(convs, schema)
    assert [c.id for c in mirrored] == [c.id for c in convs]
    for conv, flip in zip(convs, mirrored):
        assert [m.content for m in flip.messages] == [m.content for m in conv.messages]
        for m, f in zip(conv.messages, flip.messages):
            assert f.labels == {k: schema[k].min + schema[k].max - v for k, v in m.labels.items()}
    assert convs[1].messages[2].labels == {"humor": 4, "quality": 3}  # the input is not modified


def _humor_only_data(write_conversations, path):
    """Each question is asked twice, once answered plainly (humor 0) and once with a joke (humor 4):
    only the label tells the two apart, so a policy that finds each reply likelier under its own
    labels has learned the conditioning."""
    from steer.core.conversation import Conversation

    convs = []
    for i in range(60):
        for funny in (0, 1):
            reply = f"Item {i} costs {i % 7} coins." + (" Ha, a bargain for a goblin!" if funny else "")
            convs.append(Conversation([Message("system", "You are a shopkeeper."),
                                       Message("user", f"How much is item {i}?"),
                                       # quality at its midpoint: mirroring leaves it as it is
                                       Message("assistant", reply, labels={"humor": 4 * funny, "quality": 2})],
                                      id=f"c{i}-{funny}", group=f"g{i}"))
    return write_conversations(path, convs)


# Slow: trains a tiny policy for about a minute on a slow VM; CI's 20 minutes are tight.
@pytest.mark.slow
def test_label_gain_is_about_zero_before_training_and_clearly_positive_once_the_policy_listens(
        shared_path, write_conversations, tmp_path):
    data = _humor_only_data(write_conversations, tmp_path / "train.jsonl")
    metrics = main(SftConfig(base_model=str(shared_path("models", "stories260K")), data=str(data),
                             output_dir=str(tmp_path / "policy"), max_steps=200, per_device_train_batch_size=8,
                             learning_rate=5e-3, eval_fraction=0.2, logging_steps=50))
    # A 40-step run learns the replies' text (eval loss 4.69 -> 0.26) with a gain of 0.0004; the
    # conditioning comes later (0.30 after 200 steps when this test was written).
    assert abs(metrics["eval_label_gain_before"]) < 0.05, metrics
    assert metrics["eval_label_gain_after"] > 0.1, metrics


def test_label_contrast_teaches_the_conditioning_in_the_steps_plain_sft_spends_on_the_text(
        shared_path, write_conversations, tmp_path):
    data = _humor_only_data(write_conversations, tmp_path / "train.jsonl")
    runs = {}
    for weight in (0.0, 1.0):
        runs[weight] = main(SftConfig(
            base_model=str(shared_path("models", "stories260K")), data=str(data), output_dir=str(tmp_path / f"p{weight}"),
            max_steps=40, per_device_train_batch_size=8, learning_rate=5e-3, eval_fraction=0.2, logging_steps=10,
            label_contrast=weight, lora_dropout=0.0))
    plain, contrast = runs[0.0], runs[1.0]
    # When written: gain 0.445 with the contrast (its margin is 0.3). Without dropout: at this
    # learning rate the step where the gain takes off moves with the dropout noise (0.02-0.62 over
    # four seeds at dropout 0.05), and this test is about the term, not the noise.
    assert plain["eval_label_gain_after"] < 0.05, plain
    assert contrast["eval_label_gain_after"] > 0.2, (plain, contrast)
    # The replies are learned as well as without it (the eval loss is under their own labels).
    assert contrast["eval_loss_after"] < 1.5 * plain["eval_loss_after"], (plain, contrast)
    saved = json.loads((tmp_path / "p1.0" / TRAINING_CONFIG_FILE).read_text())
    assert saved["label_contrast"] == 1.0 and saved["label_contrast_margin"] == 0.3
    assert saved["label_contrast_mirror"] == "all"


def _humor_and_creativity_data(write_conversations, path):
    """Every question answered four ways: with or without a long scenic opening (creativity 4 or 0)
    and with or without a short joke at the end (humor 4 or 0). The opening is the easier label to
    learn: it is longer and comes first."""
    from steer.core.conversation import Conversation

    convs = []
    for i in range(48):
        for funny in (0, 1):
            for scenic in (0, 1):
                reply = (("The shop smells of cinnamon and old maps, and the lamps hum like sleepy bees. " if scenic
                          else "") + f"Item {i} costs {i % 7} coins." + (" Ha, a bargain for a goblin!" if funny else ""))
                convs.append(Conversation(
                    [Message("user", f"How much is item {i}?"),
                     Message("assistant", reply, labels={"humor": 4 * funny, "creativity": 4 * scenic})],
                    id=f"c{i}-{funny}{scenic}", group=f"g{i}"))
    return write_conversations(path, convs)


# Slow: trains a tiny policy for about a minute on a slow VM; CI's 20 minutes are tight.
@pytest.mark.slow
def test_mirroring_one_label_at_a_time_teaches_the_label_that_mirroring_all_leaves_behind(
        shared_path, write_conversations, tmp_path):
    data = _humor_and_creativity_data(write_conversations, tmp_path / "train.jsonl")
    gains = {}
    for mirror in ("all", "one"):
        metrics = main(SftConfig(
            base_model=str(shared_path("models", "stories260K")), data=str(data), output_dir=str(tmp_path / mirror),
            max_steps=80, per_device_train_batch_size=8, learning_rate=5e-3, eval_fraction=0.2, logging_steps=20,
            label_contrast=1.0, label_contrast_mirror=mirror, label_gain_by_attribute=True))
        gains[mirror] = metrics["eval_label_gain_by_attribute"]
    # When written: all {humor 0.098, creativity 0.617}, one {humor 0.248, creativity 0.436}. Mirroring
    # both labels at once, the opening alone met the margin by step 60 and the term went quiet.
    assert gains["one"]["humor"] > max(0.15, 2 * gains["all"]["humor"]), gains
    assert gains["one"]["creativity"] > 0.3, gains


def test_contrast_copies_are_the_same_reply_under_mirrored_labels(sft_conversations, llama_tokenizer):
    from steer.core.conversation import Conversation

    template = PromptTemplate(SCHEMA)
    convs = sft_conversations(4)
    midpoint = {a.name: (a.min + a.max) // 2 for a in SCHEMA.attributes if (a.min + a.max) % 2 == 0}
    one_off = tokenize_conversations([Conversation([Message("user", "Hi"), Message(
        "assistant", "Hello.", labels={**midpoint, "humor": 4})])], template, llama_tokenizer, 512,
        contrast=ContrastPicker(SCHEMA, "all"))[0]
    # Only humor to mirror: the copy mirrors one label, but per-attribute gaps are for --label-contrast-mirror one.
    assert one_off.contrast_names == ("humor",) and one_off.contrast_attribute == -1
    convs.append(Conversation([Message("user", "Hi"), Message("assistant", "Hello.", labels=midpoint)], id="mid"))
    examples = tokenize_conversations(convs, template, llama_tokenizer, max_length=512,
                                      contrast=ContrastPicker(SCHEMA, "all"))
    assert examples[-1].contrast is None  # mirroring a midpoint changes nothing: no pair to contrast
    for ex in examples[:-1]:
        assert ex.contrast is not None and ex.contrast.input_ids != ex.input_ids
        reply = [t for t in ex.labels if t != IGNORE_INDEX]
        assert [t for t in ex.contrast.labels if t != IGNORE_INDEX] == reply
    assert all(ex.contrast is None for ex in tokenize_conversations(convs, template, llama_tokenizer, 512))

    batch = SftCollator(llama_tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels,
          **({"contrast_input_ids": e.contrast.input_ids, "contrast_labels": e.contrast.labels} if e.contrast else {})}
         for e in reversed(examples)])
    assert batch["contrast_rows"].tolist() == [1, 2, 3, 4]  # row 0 is the midpoint example
    for row, ex in zip(batch["contrast_rows"].tolist(), reversed(examples[:-1])):
        n = len(ex.contrast.input_ids)
        i = row - 1
        assert batch["contrast_input_ids"][i, :n].tolist() == ex.contrast.input_ids
        assert batch["contrast_attention_mask"][i, :n].all() and not batch["contrast_attention_mask"][i, n:].any()
        assert batch["input_ids"][row, :len(ex.input_ids)].tolist() == ex.input_ids


def test_contrast_copies_mirroring_one_label_take_turns_over_the_attributes(sft_conversations, llama_tokenizer):
    from steer.core.attributes import Attribute, AttributeSchema
    from steer.core.conversation import Conversation

    schema = AttributeSchema("three", (Attribute("a", 0, 4, 2), Attribute("b", 0, 4, 2), Attribute("c", 0, 4, 2)))
    template = PromptTemplate(schema)
    # The last one can only mirror b: a and c sit at their midpoint.
    labels = [{"a": 0, "b": 4, "c": 1}, {"a": 4, "b": 1, "c": 3}, {"a": 1, "b": 3, "c": 0}, {"a": 2, "b": 0, "c": 2}] * 4
    convs = [Conversation([Message("user", f"Question {i}?"), Message("assistant", f"Answer {i}.", labels=lab)],
                          id=str(i)) for i, lab in enumerate(labels)]
    examples = tokenize_conversations(convs, template, llama_tokenizer, 512, contrast=ContrastPicker(schema, "one"))
    mirrored = []
    for ex, conv in zip(examples, convs):
        own = conv.messages[-1].labels
        (name,) = ex.contrast_names
        assert 2 * own[name] != 4  # only a label that mirroring changes
        assert ex.contrast_attribute == schema.names.index(name)
        copy = tokenize_conversations(
            [Conversation([conv.messages[0], Message("assistant", conv.messages[-1].content,
                                                     labels={**own, name: 4 - own[name]})])],
            template, llama_tokenizer, 512)[0]
        assert ex.contrast.input_ids == copy.input_ids  # that label mirrored, the others as they were
        mirrored.append(name)
    assert mirrored[3::4] == ["b"] * 4
    counts = [mirrored.count(n) for n in "abc"]
    assert sum(counts) == 16 and max(counts) - min(counts) <= 1, counts  # turns, not the first one each time
    batch = SftCollator(llama_tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels, "contrast_input_ids": e.contrast.input_ids,
          "contrast_labels": e.contrast.labels, "contrast_attribute": e.contrast_attribute} for e in examples[:3]])
    assert batch["contrast_attribute"].tolist() == [schema.names.index(n) for n in mirrored[:3]]


def test_contrast_loss_is_plain_cross_entropy_plus_a_hinge_on_the_label_gap():
    from steer.training.label_contrast import contrast_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[:, :2] = IGNORE_INDEX
    labels[2] = labels[0]  # row 2 mirrors row 0
    own_ce = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, 11), labels[:2, 1:].reshape(-1),
                                               ignore_index=IGNORE_INDEX)
    ce, hinge, gap = contrast_loss(logits, labels, 2, torch.tensor([0]), margin=0.5)
    assert torch.allclose(ce, own_ce)
    # Same logits under both label sets: no gap, the full margin is missing.
    logits[2] = logits[0]
    ce, hinge, gap = contrast_loss(logits, labels, 2, torch.tensor([0]), margin=0.5)
    assert abs(float(gap)) < 1e-6 and abs(float(hinge) - 0.5) < 1e-6
    # The reply's tokens far less likely under the mirrored labels: the margin is met, no loss.
    logits[2].scatter_(1, labels[0].clamp(min=0).roll(-1).unsqueeze(1), -30.0)
    ce, hinge, gap = contrast_loss(logits, labels, 2, torch.tensor([0]), margin=0.5)
    assert float(gap) > 0.5 and float(hinge) == 0.0
    ce, hinge, gap = contrast_loss(logits, labels, 2, torch.tensor([], dtype=torch.long), margin=0.5)
    assert float(hinge) == 0.0 and torch.allclose(ce, own_ce)


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))


def test_the_head_runs_over_the_reply_window_only_and_the_loss_is_the_same(sft_conversations, llama_tokenizer,
                                                                           tmp_path):
    """SftTrainer asks for the logits of the positions that predict reply tokens (and those after
    them) only: the prompt's share of the LM head and softmax is skipped; the loss is unchanged."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from steer.training.label_contrast import LabelContrastTrainer, contrast_loss
    from steer.training.sft_trainer import SftTrainer, keeps_logits, reply_window

    examples = tokenize_conversations(sft_conversations(4), PromptTemplate(SCHEMA), llama_tokenizer, max_length=512)
    batch = SftCollator(llama_tokenizer.pad_token_id)([{"input_ids": e.input_ids, "labels": e.labels}
                                                       for e in examples])
    labels = batch["labels"]
    width = labels.shape[1]
    keep = reply_window(labels)
    first_trained = min(int((row != IGNORE_INDEX).nonzero()[0]) for row in labels)
    assert keep == width - first_trained + 1 < width  # from the position that predicts the first reply token
    assert reply_window(torch.full((2, 5), IGNORE_INDEX)) is None

    model = get_peft_model(_tiny_llama(len(llama_tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert keeps_logits(model)
    model.eval()
    full = model(**batch)
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.logits.shape[1]))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SftTrainer(model=model, args=args)
    assert torch.allclose(trainer.compute_loss(model, dict(batch)), full.loss, atol=1e-6)
    assert seen == [keep]

    # The label contrast: own rows and mirrored copies through one forward over the window (or two,
    # when the copies reuse their rows' KV cache: the same loss).
    model.train()
    contrast = {"contrast_input_ids": batch["input_ids"][:2], "contrast_attention_mask": batch["attention_mask"][:2],
                "contrast_labels": labels[:2], "contrast_rows": torch.tensor([1, 0]),
                "contrast_attribute": torch.tensor([-1, -1])}
    ids, mask = torch.cat([batch["input_ids"], contrast["contrast_input_ids"]]), torch.cat(
        [batch["attention_mask"], contrast["contrast_attention_mask"]])
    ce, hinge, _ = contrast_loss(model(input_ids=ids, attention_mask=mask).logits, torch.cat([labels, labels[:2]]),
                                 4, contrast["contrast_rows"], 0.5)
    trainer = LabelContrastTrainer(model=model, args=args, label_contrast=2.0, label_contrast_margin=0.5)
    assert trainer.shares_prefix
    trainer.shares_prefix = False
    seen.clear()
    loss = trainer.compute_loss(model, {**batch, **contrast})
    assert torch.allclose(loss, ce + 2.0 * hinge, atol=1e-5) and seen == [keep]
    trainer.shares_prefix = True
    seen.clear()
    assert torch.allclose(trainer.compute_loss(model, {**batch, **contrast}), loss, atol=1e-5)
    assert seen[0] == keep and len(seen) == 2


def _contrast_pairs(tokenizer, turns: int):
    """Labelled conversations of ``turns`` exchanges whose first replies sit at their scales'
    midpoints (mirroring leaves them as they are) and whose last reply does not: each copy parts
    from its row at the last label line, after earlier trained replies."""
    from steer.core.conversation import Conversation

    midpoint = {a.name: (a.min + a.max) // 2 for a in SCHEMA.attributes if (a.min + a.max) % 2 == 0}
    convs = []
    for i in range(4):
        messages = []
        for t in range(turns):
            labels = midpoint if t < turns - 1 else {**midpoint, "humor": i % 5, "creativity": (i + 2) % 5}
            messages += [Message("user", f"Question {t} of customer {i}: what is this{' thing' * i}?"),
                         Message("assistant", f"That is item {i}-{t}, a fine{' old' * (i + t)} lamp.", labels=labels)]
        convs.append(Conversation(messages, id=str(i)))
    examples = tokenize_conversations(convs, PromptTemplate(SCHEMA), tokenizer, max_length=512,
                                      contrast=ContrastPicker(SCHEMA, "all"))
    return SftCollator(tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels,
          **({"contrast_input_ids": e.contrast.input_ids, "contrast_labels": e.contrast.labels} if e.contrast else {})}
         for e in examples])


@pytest.mark.parametrize("turns", [1, 2])
def test_contrast_copies_reuse_their_rows_cache_with_the_same_loss_and_gradients(llama_tokenizer, tmp_path, turns):
    """The mirrored copies run from where they part from their own rows, on those rows' KV cache:
    loss, label gap and every LoRA gradient equal running them in full, also when earlier trained
    replies of the conversation lie in the shared part (two turns)."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from steer.training.label_contrast import LabelContrastTrainer, copy_tails

    batch = _contrast_pairs(llama_tokenizer, turns)
    rows = batch["contrast_rows"]
    assert len(rows) >= 3
    tails = copy_tails(batch["input_ids"], batch["attention_mask"], batch["contrast_input_ids"],
                       batch["contrast_attention_mask"], batch["contrast_labels"], rows)
    for j, row in enumerate(rows.tolist()):
        start = int(tails.start[j])
        own, copy = batch["input_ids"][row], batch["contrast_input_ids"][j]
        assert own[:start + 1].tolist() == copy[:start + 1].tolist() and own[start + 1] != copy[start + 1]
        n = int(batch["contrast_attention_mask"][j].sum())
        assert tails.input_ids[j, :n - start].tolist() == copy[start:n].tolist()
        assert tails.attention_mask[j, :tails.shared].sum() == start
        if turns == 2:  # the first reply is trained and shared
            assert (batch["contrast_labels"][j, :start + 1] != IGNORE_INDEX).any()
    assert tails.input_ids.shape[1] < batch["contrast_input_ids"].shape[1]

    model = get_peft_model(_tiny_llama(len(llama_tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    widths = []
    model.register_forward_hook(lambda module, args, kwargs, output: widths.append(kwargs["input_ids"].shape[1]),
                                with_kwargs=True)
    trainer = LabelContrastTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                       use_cpu=True),
                                   label_contrast=2.0, label_contrast_margin=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for shared in (False, True):
        trainer.shares_prefix = shared
        trainer._contrast.gap = 0.0
        widths.clear()
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        results[shared] = (loss.detach(), trainer._contrast.gap, torch.cat([p.grad.flatten() for p in params]))
        assert len(widths) == (2 if shared else 1)
    assert widths[1] == tails.input_ids.shape[1]
    (loss_full, gap_full, grad_full), (loss_shared, gap_shared, grad_shared) = results[False], results[True]
    assert torch.allclose(loss_full, loss_shared, atol=1e-5) and abs(gap_full - gap_shared) < 1e-5
    assert gap_full != 0.0
    assert torch.allclose(grad_full, grad_shared, atol=1e-6, rtol=1e-4)


def test_contrast_copies_run_in_full_where_the_cache_has_sliding_windows(llama_tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM, TrainingArguments

    from steer.training.label_contrast import LabelContrastTrainer

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(llama_tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             sliding_window=8))
    model.train()
    batch = _contrast_pairs(llama_tokenizer, 1)
    trainer = LabelContrastTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                       use_cpu=True),
                                   label_contrast=2.0, label_contrast_margin=0.5)
    assert trainer.shares_prefix
    first = trainer.compute_loss(model, dict(batch))
    assert not trainer.shares_prefix  # it found the sliding layers and ran the copies in full
    assert torch.allclose(trainer.compute_loss(model, dict(batch)), first, atol=1e-6)
