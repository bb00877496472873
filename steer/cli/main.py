"""The ``steer`` command. One subcommand per entry point, each a config dataclass plus ``main``.

Every entry point lives in its own module as ``SomethingConfig`` (a dataclass whose fields carry
``help`` metadata) and ``main(config)``. This file only maps names to those modules and imports
the one that is asked for, so ``steer --help`` stays fast and no model code loads early.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from steer.core.errors import SteerError

logger = logging.getLogger("steer")

# name -> (module, config class, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "apm train": ("steer.training.apm", "ApmTrainConfig", "Train an attribute prediction model on rated conversations."),
    "apm eval": ("steer.training.apm_eval", "ApmEvalConfig", "Score an APM on held-out ratings (Pearson, Spearman, MAE)."),
    "apm cv": ("steer.training.apm", "ApmCvConfig", "Cross-validate the APM recipe over conversations, beside two baselines."),
    "relabel": ("steer.training.relabel", "RelabelConfig", "Annotate a dataset with an APM's attribute predictions."),
    "sft": ("steer.training.sft", "SftConfig", "Attribute-conditioned LoRA fine-tuning of a causal LM."),
    "generate": ("steer.cli.generate", "GenerateConfig", "Generate a reply with chosen attribute values, or one per line of a request file (--input)."),
    "demo": ("steer.training.demo.pipeline", "DemoConfig", "Run the whole pipeline offline on the bundled game-NPC data."),
    "eval steerability": ("steer.training.steerability", "SteerabilityConfig",
                          "Measure how well a policy follows requested attribute values (plots, best-of-n, baseline)."),
    "eval preference": ("steer.training.preference", "PreferenceConfig",
                        "Accuracy of the APM as a reward model on preference pairs (hh-rlhf, HelpSteer2)."),
    "export gguf": ("steer.cli.export_gguf", "ExportGgufConfig",
                    "Write a policy as one GGUF file (merged, tokenizer and steer settings inside) or a LoRA GGUF."),
    "serve": ("steer.service.cli", "ServeConfig", "Serve an OpenAI-compatible steerable chat API."),
    "ui": ("steer.ui.cli", "UiConfig", "Open the Gradio chat UI against a running steer server."),
}


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where it tells something: not where the help already speaks of its
    default, not for an unset value (None, empty list) and not for an off switch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default in (None, False, "", [], argparse.SUPPRESS)
                or action.required or not action.option_strings):
            return text
        return super()._get_help_string(action)


def build_parser(config_cls, prog: str, description: str) -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_cls, prog=prog, description=description, formatter_class=HelpFormatter)
    # argparse lists required options under "options" with the rest; give them their own group.
    required = parser.add_argument_group("required arguments")
    for action in parser._actions:
        if action.required and action.option_strings:
            parser._optionals._group_actions.remove(action)
            required._group_actions.append(action)
    parser._action_groups.remove(required)
    parser._action_groups.insert(1, required)  # before the optional ones
    for action in parser._actions:
        # HfArgumentParser gives list fields nargs="+" with the "store" action, so a repeated
        # flag (--attr humor=4 --attr creativity=2) would silently keep only the last one.
        if action.nargs == "+" and type(action).__name__ == "_StoreAction":
            action.__class__ = argparse._ExtendAction  # copies the default list before extending
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("steer")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _top_level_help() -> str:
    lines = ["usage: steer [--log-level LEVEL] [--version] COMMAND [options]", "", "commands:"]
    for name, (_, _, help_text) in COMMANDS.items():
        lines.append(f"  {name:<18} {help_text}")
    lines += ["", "Run `steer COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    level = "INFO"
    if argv[:1] == ["--log-level"] and len(argv) >= 2:
        level, argv = argv[1], argv[2:]
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"steer {version()}")
        return 0
    name = argv[0]
    if name == "apm":
        if len(argv) < 2 or argv[1] not in ("train", "eval", "cv"):
            print("usage: steer apm {train,eval,cv} [options]\n\n  train  " + COMMANDS["apm train"][2]
                  + "\n  eval   " + COMMANDS["apm eval"][2] + "\n  cv     " + COMMANDS["apm cv"][2])
            return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
        name, rest = f"apm {argv[1]}", argv[2:]
    elif name == "eval":
        if len(argv) < 2 or argv[1] not in ("steerability", "preference"):
            print("usage: steer eval {steerability,preference} [options]\n\n  steerability  "
                  + COMMANDS["eval steerability"][2] + "\n  preference    " + COMMANDS["eval preference"][2])
            return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
        name, rest = f"eval {argv[1]}", argv[2:]
    elif name == "export":
        if len(argv) < 2 or argv[1] != "gguf":
            print("usage: steer export gguf [options]\n\n  gguf  " + COMMANDS["export gguf"][2])
            return 0 if len(argv) > 1 and argv[1] in ("-h", "--help") else 2
        name, rest = f"export {argv[1]}", argv[2:]
    else:
        rest = argv[1:]
    if name not in COMMANDS:
        print(f"steer: unknown command {name!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module_name, config_name, help_text = COMMANDS[name]
    setup_logging(level)
    module = importlib.import_module(module_name)
    parser = build_parser(getattr(module, config_name), prog=f"steer {name}", description=help_text)
    try:
        # Training configs check their fields when built (``__post_init__``).
        (config,) = parser.parse_args_into_dataclasses(args=rest)
        result = module.main(config)
    except SteerError as e:
        field = f" [{e.field}]" if getattr(e, "field", None) else ""
        print(f"steer {name}: error{field}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"steer {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        close_process_group()
    return result if isinstance(result, int) else 0


def close_process_group() -> None:
    """Under ``accelerate launch`` or ``torchrun`` each rank leaves its process group before it
    exits. A gloo group left to the interpreter's exit is torn down under its own threads: once in
    CI a rank aborted that way ("terminate called without an active exception") after its training
    had finished and the policy was written, failing the launch."""
    torch = sys.modules.get("torch")  # a command that never imported torch started no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
