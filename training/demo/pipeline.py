"""``steer demo``: the whole SteerLM pipeline, offline, on the bundled game-NPC data.

Stages (each writes ``WORKDIR/stages/NAME.done`` with its settings when finished, so a rerun with
the same settings skips it; a stage whose settings changed runs again, and so do the ones after it):

1. ``apm``: train the attribute prediction model on ``rated.jsonl`` (helpfulness, humor,
   creativity, 0-4) with ``steer.training.apm``;
2. ``relabel``: annotate ``unrated.jsonl`` with it (``steer.training.relabel``);
3. ``base``: build a base model that needs no download: a byte-level BPE tokenizer trained on
   the unlabelled dialogue and a ~1M parameter Llama pretrained on that dialogue (no labels);
4. ``sft``: attribute-conditioned LoRA SFT of that base on the relabeled data (``steer.training.sft``),
   written as a policy directory ``WORKDIR/policy``;
5. ``evaluate``: generate replies to held-out player lines over a grid of requested values and
   score them with the APM: the Spearman correlation between requested value and APM score is
   the policy's steerability. Written to ``WORKDIR/report.json``.

Afterwards ``steer serve --policy WORKDIR/policy --apm WORKDIR/apm`` serves the result.
"""

from __future__ import annotations

import json
import logging
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steer.core.attributes import Attribute, AttributeSchema
from steer.core.conversation import Conversation
from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

STAGES = ("apm", "relabel", "base", "sft", "evaluate")

# ``steer demo --base-model``: settings that fit a ~135M chat model on a small CPU within the demo's
# 45-minute budget. Plain LoRA SFT of SmolLM2-135M-Instruct learned the replies' text and ignored
# its labels in every run that fit (96-240 steps; label gain 0.0003-0.0037), so the default adds
# the label contrast (steer sft --label-contrast), which needs the labels opening the reply. At
# weight 3, 100 steps of 8 sequences of at most 192 tokens (15 s each) reached a label gain of
# 0.243 (docs/sft.md, fifth run; weight 10 was unsteady). With the labels written as words the
# instruct model already reads ("completely serious"), the same run reached 0.405, and humor, which
# the numbers left untaught (gain 0.002), 0.091 (sixth run); but the longer label lines took the
# whole run to about 50 min. At 80 steps (eighth run) the label gain was 0.334 and humor led prompt
# steering under the demo APM; the run took 54 min on a VM 1.3-1.5x slower than the one the budget
# was set on. With the contrast copies continuing from their rows' KV cache and the evaluation
# decoding 48 replies at once (ninth run), 45.9 min; with the GGUF base loaded faster (tenth run),
# 40.9 min on a VM 1.5-1.8x slower than the budget's (docs/sft.md).
PRETRAINED_DEFAULTS = {
    "sft_steps": 80, "sft_batch_size": 8, "sft_max_length": 192, "sft_lr": 4e-4, "lora_r": 16,
    "eval_prompts": 12, "max_new_tokens": 64, "best_of": "1,4", "heldout_replies": 64, "label_placement": "reply",
    "label_wording": "words", "sft_label_contrast": 3.0, "sft_label_contrast_mirror": "all",
}


class DemoError(SteerError, RuntimeError):
    pass


@dataclass
class DemoConfig:
    workdir: str = field(default="steer-demo", metadata={"help": "Where the APM, policy and report are written."})
    quick: bool = field(default=False, metadata={"help": "Tiny settings (a smoke test, not a steerable model)."})
    fresh: bool = field(default=False, metadata={"help": "Delete WORKDIR first and run every stage again."})
    limit: int | None = field(default=None, metadata={"help": "Use at most this many unrated conversations (relabel, SFT)."})
    apm_limit: int | None = field(default=None, metadata={"help": "Train the APM on at most this many rated conversations."})
    apm_epochs: float = field(default=6.0, metadata={"help": "APM training epochs."})
    apm_max_length: int = field(default=96, metadata={"help": "APM tokens per item."})
    apm_lr: float = field(default=1e-3, metadata={"help": "APM learning rate (high: its encoder starts from scratch)."})
    apm_hidden_size: int = field(
        default=128, metadata={"help": "Width of the demo APM's 2-layer encoder (MiniLM's tokenizer, random init)."}
    )
    vocab_size: int = field(default=1024, metadata={"help": "Vocabulary of the demo's own tokenizer."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the tiny base model."})
    num_layers: int = field(default=4, metadata={"help": "Layers of the tiny base model."})
    pretrain_epochs: float = field(default=6.0, metadata={"help": "Pretraining epochs of the base on unlabelled text."})
    sft_epochs: float = field(default=6.0, metadata={"help": "Attribute-conditioned SFT epochs."})
    sft_lr: float | None = field(default=None, metadata={
        "help": "SFT learning rate (default 5e-3 for the tiny base, 2e-4 with --base-model)."})
    lora_r: int = field(default=16, metadata={"help": "SFT LoRA rank."})
    seeds: int = field(default=2, metadata={"help": "Sampling seeds per prompt and value in the steerability grid."})
    eval_prompts: int | None = field(default=None, metadata={"help": "Use at most this many held-out player lines."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Tokens per generated reply (default 96, 64 with --base-model)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature for the evaluation."})
    samples: int = field(default=4, metadata={"help": "Player lines shown side by side at low and high values."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    base_model: str | None = field(default=None, metadata={
        "help": "Fine-tune this pretrained chat model (hub id, directory or .gguf file) with LoRA instead of building "
                "a tiny one, and compare it with prompt steering of the unmodified model."})
    judge_apm: str | None = field(default=None, metadata={
        "help": "With --base-model: an APM directory used as an independent judge (e.g. one trained on OpenAssistant)."})
    judge_data: str | None = field(default=None, metadata={
        "help": "With --base-model: rated data to train the independent judge on (and whose replies measure the "
                "fine-tune's general ability), e.g. ../shared/data/oasst1-en/messages.jsonl."})
    judge_format: str = field(default="oasst", metadata={"help": "Format of --judge-data."})
    sft_steps: int | None = field(default=None, metadata={"help": "With --base-model: LoRA optimizer steps."})
    sft_batch_size: int | None = field(default=None, metadata={"help": "With --base-model: sequences per step."})
    sft_max_length: int | None = field(default=None, metadata={"help": "With --base-model: tokens per sequence."})
    best_of: str | None = field(default=None, metadata={"help": "With --base-model: best-of sizes evaluated, e.g. 1,4."})
    label_placement: str | None = field(default=None, metadata={
        "help": "With --base-model and a chat-template base: where the attribute labels go (reply: opening the "
                "assistant turn, as SteerLM does; system: closing the system message)."})
    label_wording: str | None = field(default=None, metadata={
        "help": "With --base-model: numbers or words, how the label line writes the values (steer sft "
                "--label-wording)."})
    sft_label_contrast: float | None = field(default=None, metadata={
        "help": "With --base-model: weight of the label-contrast term of the SFT (steer sft --label-contrast)."})
    sft_label_contrast_mirror: str | None = field(default=None, metadata={
        "help": "With --base-model: all or one, what each label-contrast copy mirrors (steer sft "
                "--label-contrast-mirror)."})
    heldout_replies: int | None = field(default=None, metadata={
        "help": "With --base-model: OpenAssistant replies whose loss is measured before and after SFT."})

    def __post_init__(self) -> None:
        # Checked here, not when the SFT stage starts after the APM has trained for minutes, against
        # steer sft's own choices.
        from steer.core.template import ChatTemplatePrompt

        if self.label_wording is not None and self.label_wording not in ChatTemplatePrompt.LABEL_WORDINGS:
            raise DemoError(f"--label-wording must be {' or '.join(ChatTemplatePrompt.LABEL_WORDINGS)}, "
                            f"got {self.label_wording!r}", "label_wording")
        if self.label_placement is not None and self.label_placement not in ChatTemplatePrompt.LABEL_PLACEMENTS:
            raise DemoError(f"--label-placement must be {' or '.join(ChatTemplatePrompt.LABEL_PLACEMENTS)}, "
                            f"got {self.label_placement!r}", "label_placement")
        if self.sft_label_contrast_mirror is not None:
            from steer.training.sft import CONTRAST_MIRRORS  # loads transformers: only when the flag is given

            if self.sft_label_contrast_mirror not in CONTRAST_MIRRORS:
                raise DemoError(f"--sft-label-contrast-mirror must be {' or '.join(CONTRAST_MIRRORS)}, "
                                f"got {self.sft_label_contrast_mirror!r}", "sft_label_contrast_mirror")
        if self.base_model:
            # A pretrained model needs a gentler learning rate and fewer, costlier steps than the
            # tiny model built from scratch; flags given on the command line still win.
            for name, value in PRETRAINED_DEFAULTS.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
            if self.quick:
                self.sft_steps, self.eval_prompts, self.best_of = 2, 2, "1,2"
                self.max_new_tokens, self.heldout_replies, self.sft_max_length = 16, 4, 128
        self.sft_lr = 5e-3 if self.sft_lr is None else self.sft_lr
        self.max_new_tokens = 96 if self.max_new_tokens is None else self.max_new_tokens
        if self.quick:
            self.limit = self.limit or 64
            self.apm_limit = min(self.apm_limit or 64, 64)
            self.apm_max_length = min(self.apm_max_length, 64)
            self.apm_epochs = min(self.apm_epochs, 1.0)
            self.apm_hidden_size = min(self.apm_hidden_size, 32)
            self.pretrain_epochs = min(self.pretrain_epochs, 1.0)
            self.sft_epochs = min(self.sft_epochs, 1.0)
            self.hidden_size = min(self.hidden_size, 64)
            self.num_layers = min(self.num_layers, 2)
            self.vocab_size = min(self.vocab_size, 512)
            self.seeds = 1
            self.eval_prompts = self.eval_prompts or 3
            self.max_new_tokens = min(self.max_new_tokens, 24)
            self.samples = min(self.samples, 2)


def demo_schema() -> AttributeSchema:
    """The three attributes the bundled data is rated on."""
    from steer.core.attributes import BUILTIN_SCHEMAS

    oasst = BUILTIN_SCHEMAS["oasst"]
    return AttributeSchema(
        name="demo",
        attributes=tuple(Attribute(name, 0, 4, default, oasst[name].description, oasst[name].levels)
                         for name, default in (("helpfulness", 4), ("humor", 2), ("creativity", 2))),
    )


# ----------------------------------------------------------------- stages
# The DemoConfig fields each stage's result depends on. A finished stage is reused only when these
# are unchanged; otherwise it runs again, and so does every stage after it (their inputs changed).
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "apm": ("apm_limit", "apm_epochs", "apm_max_length", "apm_lr", "apm_hidden_size"),
    "relabel": ("limit",),
    "judge": ("judge_apm", "judge_data", "judge_format"),
    "base": ("limit", "vocab_size", "hidden_size", "num_layers", "pretrain_epochs"),
    "sft": ("base_model", "limit", "apm_limit", "lora_r", "sft_epochs", "sft_lr", "sft_steps", "sft_batch_size",
            "sft_max_length", "label_placement", "label_wording", "sft_label_contrast",
            "sft_label_contrast_mirror"),
    "evaluate": ("base_model", "eval_prompts", "max_new_tokens", "samples", "seeds", "temperature", "best_of",
                 "heldout_replies", "judge_apm", "judge_data", "judge_format"),
}
# Fields that change no stage's result: where it goes, how fast it runs, or (``quick``) presets
# that take effect through the fields above.
NO_RESULT_SETTINGS = ("workdir", "quick", "fresh", "threads")


def stage_settings(config: DemoConfig, name: str) -> dict[str, Any]:
    return {key: getattr(config, key) for key in STAGE_SETTINGS[name]}


def _same_settings(recorded: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
    """Whether a stage ran with ``settings``. A setting that a newer steer added is recorded by
    none of the older runs; when it is unset (None) the older run counts as having had it unset."""
    if recorded is None:
        return False
    return all(recorded.get(k) == settings.get(k) for k in set(recorded) | set(settings))


class Stages:
    """Finished stages are recorded in ``WORKDIR/stages/NAME.done`` with the settings they ran with.

    A stage is reused when it finished with the same settings and no stage before it ran in this
    run; otherwise it runs again. A stage that starts over (other settings, or new inputs from an
    earlier stage) first removes its old outputs; one cut short with the same settings keeps them,
    so it resumes where it stopped.
    """

    def __init__(self, workdir: Path):
        self.dir = workdir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.peak_rss_gb: dict[str, float | None] = {}
        self.ran: list[str] = []  # stages run (not reused) so far in this run

    def _record(self, name: str, kind: str) -> dict[str, Any] | None:
        path = self.dir / f"{name}.{kind}"
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}  # unreadable: settings unknown, so the stage runs again
        return record if isinstance(record, dict) else {}

    def done(self, name: str) -> bool:
        return (self.dir / f"{name}.done").exists()

    def run(self, name: str, fn, settings: dict[str, Any] | None = None, outputs=lambda: ()) -> None:
        """Runs ``fn`` unless stage ``name`` already finished with ``settings``. ``outputs()`` lists
        the files and directories the stage writes, removed when it starts over."""
        settings = json.loads(json.dumps(settings or {}))  # compared as stored (tuples become lists)
        done, started = self._record(name, "done"), self._record(name, "started")
        if done is not None and _same_settings(done.get("settings"), settings) and not self.ran:
            logger.info("stage %s: already done, reusing it", name)
            self.timings[name] = done.get("seconds", 0.0)
            self.peak_rss_gb[name] = done.get("peak_rss_gb")
            return
        previous = done if done is not None else started
        if self.ran:
            why = f"{self.ran[-1]} ran again"
        elif previous is not None and not _same_settings(previous.get("settings"), settings):
            old = previous.get("settings")
            why = ("its settings were not recorded" if old is None else
                   "settings changed: " + ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items()
                                                     if old.get(k) != v))
        else:
            why = None  # first run, or resuming a run cut short with the same settings
        if why:
            logger.info("stage %s: running again (%s)", name, why)
            for path in outputs():
                path = Path(path)
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        else:
            logger.info("stage %s: running", name)
        (self.dir / f"{name}.done").unlink(missing_ok=True)
        (self.dir / f"{name}.started").write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
        measured = reset_peak_rss()
        start = time.perf_counter()
        fn()
        seconds = round(time.perf_counter() - start, 2)
        peak = peak_rss_gb() if measured else None
        self.timings[name] = seconds
        self.peak_rss_gb[name] = peak
        self.ran.append(name)
        (self.dir / f"{name}.done").write_text(
            json.dumps({"seconds": seconds, "peak_rss_gb": peak, "settings": settings}) + "\n", encoding="utf-8")
        (self.dir / f"{name}.started").unlink(missing_ok=True)
        logger.info("stage %s: done in %.1f s%s", name, seconds, f", peak RSS {peak:.2f} GB" if peak else "")


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window for this process, so each stage reports its own peak (Linux:
    writing 5 to /proc/self/clear_refs resets VmHWM). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float | None:
    """This process's peak resident memory since the last :func:`reset_peak_rss`, in GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except OSError:
        pass
    return None


def load_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def stage_apm(config: DemoConfig, work: Path) -> None:
    from steer.demo_data import rated_path
    from steer.training.apm import ApmTrainConfig
    from steer.training.apm import main as train_apm

    from transformers import BertConfig, BertModel

    from steer.models.apm import default_backbone
    from steer.models.modeling import load_tokenizer

    schema_file = work / "schema.json"
    demo_schema().save(schema_file)
    # Fine-tuning MiniLM (the default APM backbone) alone would take most of the 10-minute budget
    # on 2 cores, and underfits in the time there is (predictions bunch up mid-scale, so relabeled
    # data loses its spread). A 2-layer encoder trained from scratch with MiniLM's real tokenizer
    # reaches a held-out Pearson of about 0.9 on this data in a couple of minutes.
    backbone = work / "apm_backbone"
    if not (backbone / "config.json").exists():
        tokenizer = load_tokenizer(default_backbone())
        torch.manual_seed(0)
        BertModel(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=config.apm_hidden_size, num_hidden_layers=2,
            num_attention_heads=max(1, config.apm_hidden_size // 32), intermediate_size=2 * config.apm_hidden_size,
            max_position_embeddings=512,
        )).save_pretrained(backbone)
        tokenizer.save_pretrained(backbone)
    train_apm(ApmTrainConfig(
        data=str(rated_path()), output_dir=str(work / "apm"), format="steer", schema=str(schema_file),
        recipe="finetune",  # the backbone starts random, so it must be trained, not frozen
        backbone=str(backbone), num_train_epochs=config.apm_epochs, max_length=config.apm_max_length,
        per_device_train_batch_size=32,
        learning_rate=config.apm_lr, freeze_embeddings=False, limit=config.apm_limit, resume=True, device="cpu",
        logging_steps=50,
    ))


def stage_relabel(config: DemoConfig, work: Path) -> None:
    from steer.demo_data import unrated_path
    from steer.training.relabel import RelabelConfig
    from steer.training.relabel import main as relabel

    relabel(RelabelConfig(
        model=str(work / "apm"), data=str(unrated_path()), output=str(work / "relabeled.jsonl"), format="steer",
        limit=config.limit, device="cpu",
    ))


def stage_base(config: DemoConfig, work: Path) -> None:
    """Tokenizer + tiny Llama pretrained on the unlabelled dialogue, saved as ``policy/base``."""
    from steer.demo_data import unrated_path
    from steer.core.template import PromptTemplate
    from steer.training.demo.tiny_model import TinyModelSpec, build_tiny_llama, pack_documents, pretrain, save_model, train_tokenizer

    schema = demo_schema()
    template = PromptTemplate(schema)
    convs = [Conversation.from_dict(r) for r in load_jsonl(unrated_path(), config.limit)]
    # The base sees the dialogue in the template's layout but never a label: conditioning is
    # what SFT has to teach it.
    docs = [template.render_text(c.messages, mode="apm") + template.end_marker for c in convs]
    # "humor:3" as one token. A BPE trained on the dialogue alone cuts it into five pieces, and the
    # ~1M parameter model then followed only the label next to the reply (creativity): humor
    # steerability 0.03 with split labels vs 0.30 with atomic ones, same base and 3 SFT epochs.
    tokenizer = train_tokenizer(docs, vocab_size=config.vocab_size, atomic=schema.label_items())
    spec = TinyModelSpec(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         num_layers=config.num_layers, num_heads=max(2, config.hidden_size // 32),
                         intermediate_size=config.hidden_size * 8 // 3 // 8 * 8)
    model = build_tiny_llama(tokenizer, spec)
    ids = [[tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    rows = pack_documents(ids, 128, tokenizer.eos_token_id)
    losses = pretrain(model, rows, epochs=config.pretrain_epochs, batch_size=16, lr=3e-3)
    logger.info("base pretraining loss %.3f -> %.3f", losses[0], float(np.mean(losses[-5:])))
    save_model(model, tokenizer, work / "policy" / "base")


def stage_sft(config: DemoConfig, work: Path) -> None:
    from steer.training.sft import SftConfig
    from steer.training.sft import main as sft

    from steer.demo_data import rated_path

    # SteerLM trains on human-rated data with its human labels plus the APM-relabeled data.
    data = work / "sft_data.jsonl"
    rated = [json.dumps(r) + "\n" for r in load_jsonl(rated_path(), config.apm_limit)]
    data.write_text("".join(rated) + (work / "relabeled.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    sft(SftConfig(
        base_model=str(work / "policy" / "base"), data=str(data), output_dir=str(work / "policy"),
        format="steer", schema=str(work / "apm"), lora_r=config.lora_r, lora_alpha=2 * config.lora_r,
        lora_dropout=0.0, lora_modules_to_save=["embed_tokens"], num_train_epochs=config.sft_epochs,
        learning_rate=config.sft_lr,
        per_device_train_batch_size=16, max_length=256, eval_fraction=0.05, save_steps=200, resume=True,
        logging_steps=20, limit=config.limit,
    ))


# ---------------------------------------------------------------- evaluate
def _prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return msgs + [{"role": "user", "content": row["user"]}]


def _generate_all(generator, requests, batch_size: int = 48, desc: str = "generate"):
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(requests), batch_size), desc=desc, unit="batch"):
        out.extend(generator.generate_batch(requests[i:i + batch_size]))
    return out


def evaluate(config: DemoConfig, work: Path) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from steer.models.apm import AttributePredictor
    from steer.demo_data import prompts_path
    from steer.runtime.generator import GenerationRequest, SteerGenerator

    generator = SteerGenerator.load(work / "policy", device="cpu")
    apm = AttributePredictor.load(work / "apm", device="cpu")
    schema = generator.schema
    prompts = load_jsonl(prompts_path(), config.eval_prompts)
    middle = {a.name: (a.min + a.max) // 2 for a in schema.attributes}

    grid, requests = [], []
    for attr in schema.attributes:
        for value in range(attr.min, attr.max + 1):
            for p_i, prompt in enumerate(prompts):
                for seed in range(config.seeds):
                    values = dict(middle, **{attr.name: value})
                    grid.append((attr.name, value, p_i))
                    requests.append(GenerationRequest(_prompt_messages(prompt), values, config.max_new_tokens,
                                                      config.temperature, 0.95, seed=1000 * seed + p_i))
    results = _generate_all(generator, requests, desc="steerability grid")
    scored = apm.predict([_prompt_messages(prompts[p]) + [{"role": "assistant", "content": r.text}]
                          for (_, _, p), r in zip(grid, results)])
    steerability: dict[str, Any] = {}
    for j, attr in enumerate(schema.attributes):
        # The APM's columns follow its own schema order; look the attribute up by name.
        col = apm.schema.names.index(attr.name)
        rows = [i for i, (name, _, _) in enumerate(grid) if name == attr.name]
        requested = np.array([grid[i][1] for i in rows], dtype=float)
        scores = scored[rows, col]
        rho = spearmanr(requested, scores).statistic
        steerability[attr.name] = {
            "spearman": None if np.isnan(rho) else round(float(rho), 4),
            "n": len(rows),
            "mean_apm_score_by_value": {
                str(v): round(float(scores[requested == v].mean()), 3) for v in range(attr.min, attr.max + 1)
            },
        }

    low = dict(middle, humor=0, creativity=0)
    high = dict(middle, humor=4, creativity=4)
    sample_requests = []
    for p_i, prompt in enumerate(prompts[: config.samples]):
        for values in (low, high):
            sample_requests.append(GenerationRequest(_prompt_messages(prompt), values, config.max_new_tokens,
                                                     config.temperature, 0.95, seed=7 + p_i))
    sample_results = _generate_all(generator, sample_requests, desc="samples")
    samples = []
    for k, prompt in enumerate(prompts[: config.samples]):
        samples.append({
            "npc": prompt.get("npc"), "system": prompt.get("system"), "user": prompt["user"],
            "low": {"attributes": sample_results[2 * k].attributes, "reply": sample_results[2 * k].text},
            "high": {"attributes": sample_results[2 * k + 1].attributes, "reply": sample_results[2 * k + 1].text},
        })
    return {"steerability": steerability, "samples": samples,
            "grid": {"prompts": len(prompts), "seeds": config.seeds, "held_at": middle,
                     "temperature": config.temperature, "max_new_tokens": config.max_new_tokens}}


def format_report(report: dict[str, Any], width: int = 100) -> str:
    lines = []
    col = (width - 3) // 2
    for s in report["samples"]:
        lines.append(f"\n[{s.get('npc') or 'npc'}] Player: {s['user']}")
        lo, hi = s["low"]["attributes"], s["high"]["attributes"]
        left_title = f"humor {lo.get('humor')}, creativity {lo.get('creativity')}"
        right_title = f"humor {hi.get('humor')}, creativity {hi.get('creativity')}"
        left = textwrap.wrap(s["low"]["reply"] or "(empty)", col) or [""]
        right = textwrap.wrap(s["high"]["reply"] or "(empty)", col) or [""]
        lines.append(f"{left_title:<{col}} | {right_title}")
        lines.append(f"{'-' * col}-+-{'-' * col}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"{a:<{col}} | {b}")
    lines.append("\nSteerability: Spearman correlation between the requested value and the APM's score")
    lines.append("of the generated reply (one attribute varied, the others held at the middle value)")
    lines.append(f"{'attribute':<12} {'spearman':>9} {'n':>5}   mean APM score at requested 0..4")
    for name, s in report["steerability"].items():
        means = " ".join(f"{v:5.2f}" for v in s["mean_apm_score_by_value"].values())
        rho = "n/a" if s["spearman"] is None else f"{s['spearman']:.3f}"
        lines.append(f"{name:<12} {rho:>9} {s['n']:>5}   {means}")
    lines.append(format_timings(report))
    return "\n".join(lines)


def format_timings(report: dict[str, Any]) -> str:
    """Each stage's wall time and, where measured, its own peak RSS."""
    text = "\nTimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.get("timings", {}).items())
    peaks = report.get("peak_rss_gb", {})
    if any(v is not None for v in peaks.values()):
        text += "\nPeak RSS per stage (GB): " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in peaks.items())
    return text


def main(config: DemoConfig) -> int:
    work = Path(config.workdir)
    if config.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    from steer.training.relabel import SIDECAR_SUFFIX

    stages = Stages(work)
    start = time.perf_counter()
    report_path = work / "report.json"

    def run(name: str, fn, *outputs: str) -> None:
        stages.run(name, fn, stage_settings(config, name), lambda: [work / o for o in outputs])

    def policy_files() -> list[Path]:  # the policy directory, but for the base stage's model inside it
        policy = work / "policy"
        return [p for p in policy.iterdir() if p.name != "base"] if policy.is_dir() else []

    run("apm", lambda: stage_apm(config, work), "apm", "apm_backbone", "schema.json")
    run("relabel", lambda: stage_relabel(config, work), "relabeled.jsonl", "relabeled.jsonl" + SIDECAR_SUFFIX)
    if config.base_model:
        from steer.training.demo import pretrained as demo_pretrained

        run("judge", lambda: demo_pretrained.stage_judge(config, work), "judge_apm")
        stages.run("sft", lambda: demo_pretrained.stage_sft(config, work), stage_settings(config, "sft"),
                   lambda: [work / "policy", work / "sft_data.jsonl"])
    else:
        run("base", lambda: stage_base(config, work), "policy/base")
        stages.run("sft", lambda: stage_sft(config, work), stage_settings(config, "sft"),
                   lambda: [*policy_files(), work / "sft_data.jsonl"])

    def run_evaluate() -> None:
        if config.base_model:
            report = demo_pretrained.evaluate(config, work)
        else:
            report = evaluate(config, work)
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    run("evaluate", run_evaluate, "report.json", "eval")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    report["timings"] = {**stages.timings, "total_this_run": round(time.perf_counter() - start, 2)}
    report["peak_rss_gb"] = dict(stages.peak_rss_gb)
    report["settings"] = {name: stage_settings(config, name) for name in stages.timings}
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(demo_pretrained.format_comparison(report) if config.base_model else format_report(report))
    print(f"\nReport: {report_path}\nServe it: steer serve --policy {work / 'policy'} --apm {work / 'apm'}")
    return 0
