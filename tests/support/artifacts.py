"""Tiny model artifacts (policies, APMs, SFT bases) that the tests build in a second or two."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from steer.core.artifacts import save_steer_config
from steer.core.attributes import Attribute, AttributeSchema
from steer.core.conversation import Conversation, Message
from steer.core.template import PromptTemplate
from tests.support.assets import shared_path

DEMO_SCHEMA = AttributeSchema(
    name="demo",
    attributes=(
        Attribute("helpfulness", 0, 4, 3, "How well the reply serves the user."),
        Attribute("humor", 0, 4, 0, "How funny the reply is.",
                  ("serious", "dry", "playful", "funny", "hilarious")),
        Attribute("creativity", 0, 4, 1, "How original the reply is."),
    ),
)

# Five attributes: three up front in the UI, two folded away in the accordion. Defaults and
# descriptions are distinctive so a test can tell they came from the server, not the UI's code.
UI_SCHEMA = AttributeSchema(
    name="ui-test",
    attributes=(
        Attribute("quality", 0, 4, 4, "Overall quality of the reply."),
        Attribute("humor", 0, 4, 1, "How funny the reply is."),
        Attribute("helpfulness", 0, 4, 3, "How well the reply serves the user."),
        Attribute("verbosity", 0, 6, 2, "How long-winded the reply is."),
        Attribute("creativity", 0, 4, 2, "How original the reply is."),
    ),
)

HELLO = [{"role": "user", "content": "Tell me a story."}]


def _copy_tokenizer(source: Path, directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, directory / name)


def build_tiny_policy(directory: Path, max_positions: int = 4096) -> Path:
    """A policy dir around a random 2-layer Llama using stories260K's tokenizer (vocab 512)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_dir = shared_path("models", "stories260K")
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory / "base", safe_serialization=True)
    _copy_tokenizer(tokenizer_dir, directory)
    save_steer_config(directory, "policy", DEMO_SCHEMA, PromptTemplate(DEMO_SCHEMA).to_dict(),
                      base_model="base", adapter=None, name="tiny-steer")
    return directory


def build_tiny_apm(directory: Path) -> Path:
    """An (untrained) APM artifact: a random 2-layer Llama regression head over the demo schema."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer_dir = shared_path("models", "stories260K")
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         num_labels=len(DEMO_SCHEMA), problem_type="regression")
    LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    _copy_tokenizer(tokenizer_dir, directory)
    save_steer_config(directory, "apm", DEMO_SCHEMA, PromptTemplate(DEMO_SCHEMA).to_dict(), max_length=256,
                      label_normalization={"mean": [2.0, 1.0, 1.5], "std": [1.0, 0.5, 0.8]})
    return directory


def build_ui_policy(directory: Path) -> Path:
    """A policy dir over UI_SCHEMA whose base model is stories260K itself (no adapter)."""
    base = shared_path("models", "stories260K")
    directory.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(base, directory)
    save_steer_config(directory, "policy", UI_SCHEMA, PromptTemplate(UI_SCHEMA).to_dict(),
                      base_model=str(base), adapter=None, name="stories-ui")
    return directory


def build_ui_apm(directory: Path) -> Path:
    """A random 1-layer Llama regressor over UI_SCHEMA, saved as an APM directory."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    base = shared_path("models", "stories260K")
    torch.manual_seed(0)
    names = UI_SCHEMA.names
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=len(names),
                         problem_type="regression", id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})
    LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
    _copy_tokenizer(base, directory)
    save_steer_config(directory, "apm", UI_SCHEMA, PromptTemplate(UI_SCHEMA).to_dict(), max_length=128,
                      label_normalization={"mean": [2.0] * len(names), "std": [0.5] * len(names)})
    return directory


def build_random_policy(directory: str | Path, schema=None, texts: Sequence[str] | None = None, seed: int = 0,
                        adapter: bool = True) -> Path:
    """A complete, untrained policy directory in a second: a tokenizer trained on ``texts``, a
    random tiny Llama as ``base/``, a randomly initialised LoRA adapter at the root and
    ``steer_config.json``. Its replies are noise."""
    from peft import LoraConfig, get_peft_model

    from steer.core.attributes import get_schema
    from steer.models.modeling import quiet_peft_deprecations
    from steer.training.demo.tiny_model import TinyModelSpec, build_tiny_llama, save_model, train_tokenizer

    directory = Path(directory)
    schema = schema or get_schema("steerlm")
    template = PromptTemplate(schema)
    if texts is None:
        texts = [
            template.render_text([Message("user", f"Tell me about item {i}, please."),
                                  Message("assistant", f"Item {i} is a fine thing. It costs {i} coins.",
                                          labels=schema.defaults)])
            for i in range(200)
        ]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    spec = TinyModelSpec(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = build_tiny_llama(tokenizer, spec, seed=seed)
    save_model(model, tokenizer, directory / "base")
    if adapter:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          task_type="CAUSAL_LM")
        with quiet_peft_deprecations():
            get_peft_model(model, lora).save_pretrained(str(directory))
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(directory))
    save_steer_config(directory, "policy", schema, template.to_dict(), base_model="base",
                      adapter="." if adapter else None, merged=None)
    return directory


def sft_conversations(n: int) -> list[Conversation]:
    """``n`` shopkeeper conversations labelled on the oasst schema; every other one is funny."""
    convs = []
    for i in range(n):
        funny = i % 2
        reply = f"Item {i} costs {i % 7} coins." + (" Ha, a bargain for a goblin!" if funny else "")
        msgs = [
            Message("system", "You are a shopkeeper."),
            Message("user", f"How much is item {i}?"),
            Message("assistant", reply, labels={"humor": 4 if funny else 0, "quality": 3}),
        ]
        if i % 3 == 0:  # some multi-turn conversations
            msgs += [Message("user", "Thanks!"), Message("assistant", "Come again.", labels={"humor": 1})]
        convs.append(Conversation(msgs, id=f"c{i}", group=f"g{i}"))
    return convs


def write_conversations(path: Path, convs: Sequence[Conversation]) -> Path:
    path.write_text("".join(json.dumps(c.to_dict()) + "\n" for c in convs))
    return path


def build_tiny_sft_base(directory: Path) -> Path:
    """A random tiny Llama with a tokenizer trained on the SFT conversations (no shared assets)."""
    from steer.core.attributes import get_schema
    from steer.training.demo.tiny_model import TinyModelSpec, build_tiny_llama, save_model, train_tokenizer

    template = PromptTemplate(get_schema("oasst"))
    texts = [template.render_text(c.messages) for c in sft_conversations(60)]
    tok = train_tokenizer(texts, vocab_size=400)
    model = build_tiny_llama(tok, TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    save_model(model, tok, directory)
    return directory
