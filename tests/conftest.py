"""Fixtures shared by the test modules: shared assets, tiny models and artifacts, servers.

The code behind them lives in tests/support/ and is imported only here, so test modules never
import one another (or a helper module): they ask for a fixture.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.support import artifacts, servers  # noqa: E402 - after the offline settings above
from tests.support.assets import SHARED  # noqa: E402
from tests.support.assets import shared_path as _shared_path  # noqa: E402


# ------------------------------------------------------------------ shared assets
def pytest_collection_modifyitems(config, items):
    """A test marked ``llamacpp`` needs llama-cpp-python: without it (CI does not build it), skip
    with a reason rather than fail."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        return
    skip = pytest.mark.skip(reason='llama-cpp-python is not installed: pip install "steer[llamacpp]"')
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir():
    """The shared assets folder (``STEER_SHARED``, by default ``../shared`` beside the repo)."""
    return SHARED


@pytest.fixture(scope="session")
def shared_path():
    """``shared_path(*parts)``: the path of a shared asset; skips the test when it is absent."""
    return _shared_path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from steer.models.modeling import load_tokenizer

    return load_tokenizer(_shared_path("tokenizers", "gpt2"))


@pytest.fixture(scope="session")
def llama_tokenizer():
    from steer.models.modeling import load_tokenizer

    return load_tokenizer(_shared_path("models", "stories260K"))


@pytest.fixture(params=["gpt2", "llama"])
def any_tokenizer(request, gpt2_tokenizer, llama_tokenizer):
    return gpt2_tokenizer if request.param == "gpt2" else llama_tokenizer


# ------------------------------------------------------------------ data
@pytest.fixture(scope="session")
def hello():
    """A one-message conversation (Tell me a story)."""
    return artifacts.HELLO


@pytest.fixture(scope="session")
def demo_schema():
    """The three-attribute schema (helpfulness, humor, creativity) of the tiny policy and APM."""
    return artifacts.DEMO_SCHEMA


@pytest.fixture(scope="session")
def ui_schema():
    """The five-attribute schema of the UI tests' policy and APM."""
    return artifacts.UI_SCHEMA


@pytest.fixture(scope="session")
def npc_examples():
    """examples/npcs: the NPC profiles shipped with the project."""
    return servers.NPC_EXAMPLES


@pytest.fixture(scope="session")
def sft_conversations():
    """``sft_conversations(n)``: n labelled shopkeeper conversations (oasst schema)."""
    return artifacts.sft_conversations


@pytest.fixture(scope="session")
def write_conversations():
    """``write_conversations(path, convs)``: writes conversations as steer JSONL, returns the path."""
    return artifacts.write_conversations


# ------------------------------------------------------------------ tiny models and artifacts
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


@pytest.fixture(scope="session")
def build_tiny_policy():
    """``build_tiny_policy(directory, max_positions=4096)``: a random 2-layer Llama policy over the
    demo schema with stories260K's tokenizer."""
    return artifacts.build_tiny_policy


@pytest.fixture(scope="session")
def build_tiny_apm():
    """``build_tiny_apm(directory)``: an untrained APM over the demo schema."""
    return artifacts.build_tiny_apm


@pytest.fixture(scope="session")
def build_random_policy():
    """``build_random_policy(directory, schema=None, texts=None, seed=0, adapter=True)``: an
    untrained policy with its own tokenizer and a random LoRA adapter (no shared assets)."""
    return artifacts.build_random_policy


@pytest.fixture(scope="session")
def build_ui_policy():
    """``build_ui_policy(directory)``: a policy over the UI schema whose model is stories260K itself
    (real, if tiny, story text; skips without the shared asset)."""
    return artifacts.build_ui_policy


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A tiny policy directory of the module's own (see ``build_tiny_policy``)."""
    return artifacts.build_tiny_policy(tmp_path_factory.mktemp("policy") / "policy")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random tiny Llama base for SFT, with a tokenizer trained on ``sft_conversations``."""
    return artifacts.build_tiny_sft_base(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def tiny_bert_backbone(tmp_path_factory):
    """A randomly initialised 2-layer BERT with MiniLM's real tokenizer: an APM backbone that
    trains in seconds."""
    from transformers import BertConfig, BertModel

    from steer.models.apm import default_backbone
    from steer.models.modeling import load_tokenizer

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
    from steer.training.apm import ApmTrainConfig
    from steer.training.apm import main as train_main

    out = tmp_path_factory.mktemp("tiny-apm")
    train_main(ApmTrainConfig(
        data=str(_shared_path("data", "helpsteer2", "sample.jsonl")), format="helpsteer", output_dir=str(out),
        backbone=str(tiny_bert_backbone), max_steps=2, per_device_train_batch_size=8, max_length=128, device="cpu",
    ))
    return out


# ------------------------------------------------------------------ torch settings
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The servers in the tests run with threads=1 (a tiny model on a shared CPU decodes fastest
    on one thread); torch's thread count is process-wide, so put it back after each module."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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


# ------------------------------------------------------------------ servers and clients
@pytest.fixture(scope="session")
def make_client():
    """``make_client(policy, **settings)``: a TestClient app with its engine in a thread."""
    return servers.make_client


@pytest.fixture(scope="session")
def make_npc_client():
    """``make_npc_client(policy, db, npcs=examples/npcs, **settings)``: an app with NPC sessions in ``db``."""
    return servers.make_npc_client


@pytest.fixture(scope="session")
def wait_ready():
    """``wait_ready(client)``: waits until the app's engine has loaded (health answers 200)."""
    return servers.wait_ready


@pytest.fixture(scope="session")
def say():
    """``say(client, sid, content, **kw)``: one line to an NPC session; returns the reply's JSON."""
    return servers.say


@pytest.fixture(scope="session")
def sse_events():
    """``sse_events(text)``: the ``data:`` payloads of a server-sent event stream, parsed."""
    return servers.sse_events


@pytest.fixture(scope="session")
def collector():
    """``collector()``: a new engine event sink (events, text, final, and a ``done`` event)."""
    return servers.Collector


@pytest.fixture(scope="session")
def live_server():
    """``live_server(app, health="/health")``: a context manager serving ``app`` with uvicorn in a
    thread on a free port (``.url``, ``.engine``), entered once health answers 200."""
    return servers.LiveServer


@pytest.fixture(scope="session")
def steer_serve():
    """``steer_serve(policy, *args, env=None, new_session=False, drop_args=())``: ``steer serve``
    as users run it, a subprocess on a free port (``.url``, ``.signal()``, ``.stop()``)."""
    from tests.support.steer_serve import SteerServe

    return SteerServe


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a free TCP port on 127.0.0.1."""
    from tests.support.postgres import free_port

    return free_port


@pytest.fixture(scope="module")
def postgres_url():
    """A ``postgresql://`` URL of an empty database on a private server (see tests/support/postgres.py)."""
    from tests.support.postgres import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def npc_live_server(tmp_path_factory):
    """A live server (thread) with the example NPCs over a tiny policy and a SQLite database."""
    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    root = tmp_path_factory.mktemp("npc-live")
    policy = artifacts.build_tiny_policy(root / "policy")
    settings = ServerSettings(policy=str(policy), ui=False, threads=1, engine_in_process=True,
                              npcs=str(servers.NPC_EXAMPLES), database_url=f"sqlite:///{root / 's.db'}")
    with servers.LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    """One live server (stories260K policy + random APM + the Gradio UI at /ui) shared by the UI
    tests and the browser test."""
    pytest.importorskip("gradio", reason="the UI needs gradio (pip install 'steer[ui]')")
    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    root = tmp_path_factory.mktemp("ui")
    settings = ServerSettings(policy=str(artifacts.build_ui_policy(root / "policy")),
                              apm=str(artifacts.build_ui_apm(root / "apm")),
                              device="cpu", max_batch_size=4, ui=True, ui_path="/ui")
    with servers.LiveServer(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="session")
def fake_upstream():
    """``fake_upstream(model, tokenizer, name="policy", max_context=512)``: a stand-in for vLLM's and
    llama-server's streaming completion APIs over a real model (``.app()``, ``.records``, knobs)."""
    from tests.support.fake_upstream import FakeUpstream

    return FakeUpstream
