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
