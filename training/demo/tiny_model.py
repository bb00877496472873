"""A tiny Llama built from scratch, so the demo needs no download.

The demo trains a byte-level BPE tokenizer on its own text, builds a ~1M parameter
``LlamaForCausalLM`` and pretrains it briefly on unlabelled dialogue (plain next-token
prediction, no attribute labels anywhere), then saves it as an ordinary Hugging Face model
directory. Attribute conditioning is learnt afterwards by LoRA SFT, exactly as with a real base.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.core.template import PromptTemplate

logger = logging.getLogger(__name__)

# The SteerLM template's markers get one token each, so the model sees them as atomic
# (non-special, so decoding keeps them and stop strings can be found in the text).
TEMPLATE_MARKERS = (PromptTemplate.system_marker, PromptTemplate.turn_marker, PromptTemplate.label_marker)


@dataclass
class TinyModelSpec:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 352
    max_positions: int = 512


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048, atomic: Sequence[str] = ()):
    """A byte-level BPE tokenizer (GPT-2 style, any text round-trips) with BOS/EOS/PAD.

    The template markers and the strings in ``atomic`` (say, ``AttributeSchema.label_items()``)
    become single tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in (*TEMPLATE_MARKERS, *atomic)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_llama(tokenizer, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pack_documents(docs: Sequence[list[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut the stream into ``seq_len`` rows.

    Standard pretraining packing: a row may span two documents, which is harmless for plain
    language modelling (unlike SFT, where examples must not attend to each other)."""
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        stream.append(eos_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pretrain(
    model,
    rows: torch.Tensor,
    epochs: float = 2.0,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Next-token pretraining on packed rows with AdamW and a cosine schedule; returns losses."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    steps_per_epoch = max(1, len(rows) // batch_size)
    total = max(1, int(steps_per_epoch * epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    bar = tqdm(range(total), desc="pretrain base", unit="step", disable=not progress)
    for _ in bar:
        if len(order) < batch_size:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[:batch_size], order[batch_size:]
        batch = rows[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def save_model(model, tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))  # safetensors
    tokenizer.save_pretrained(str(directory))
