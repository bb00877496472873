import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(os.environ.get("STEER_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared asset {path} is absent (set STEER_SHARED to the shared/ folder)")
    return path


@pytest.fixture(scope="session")
def tiny_llama():
    """A random two-layer Llama. Two KV heads for four query heads, so grouped-query attention
    paths are exercised too."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def sdpa_backends(monkeypatch):
    """Records, for every scaled-dot-product attention call, which CUDA backends were enabled:
    (cudnn, mem_efficient, flash, math)."""
    import torch

    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    return seen


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from steer.modeling import load_tokenizer

    return load_tokenizer(shared_path("tokenizers", "gpt2"))


@pytest.fixture(scope="session")
def llama_tokenizer():
    from steer.modeling import load_tokenizer

    return load_tokenizer(shared_path("models", "stories260K"))


@pytest.fixture(params=["gpt2", "llama"])
def any_tokenizer(request, gpt2_tokenizer, llama_tokenizer):
    return gpt2_tokenizer if request.param == "gpt2" else llama_tokenizer


@pytest.fixture(scope="session")
def tiny_bert_backbone(tmp_path_factory):
    """A randomly initialised 2-layer BERT with MiniLM's real tokenizer: an APM backbone that
    trains in seconds."""
    from transformers import BertConfig, BertModel

    from steer.apm import default_backbone
    from steer.modeling import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer(default_backbone())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_apm_dir(tiny_bert_backbone, tmp_path_factory):
    """A (barely) trained APM on the helpsteer schema, saved as `steer apm train` saves it."""
    from training.apm import ApmTrainConfig
    from training.apm import main as train_main

    out = tmp_path_factory.mktemp("tiny-apm")
    train_main(ApmTrainConfig(
        data=str(shared_path("data", "helpsteer2", "sample.jsonl")), format="helpsteer", output_dir=str(out),
        backbone=str(tiny_bert_backbone), max_steps=2, per_device_train_batch_size=8, max_length=128, device="cpu",
    ))
    return out


class LiveServer:
    """An ASGI app served by uvicorn in a thread on 127.0.0.1, ready once ``health`` answers 200."""

    def __init__(self, app, health: str = "/health"):
        import socket
        import threading

        import uvicorn

        self.app, self.health = app, health
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        import httpx

        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}{self.health}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server at {self.url} did not become healthy")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.server.engine
