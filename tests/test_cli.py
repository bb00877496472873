"""Command-line conventions shared by every ``steer`` command (steer/cli/main.py)."""

from __future__ import annotations

import importlib
import re

import pytest

from steer.cli.main import COMMANDS, HelpFormatter, build_parser, main


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"steer \S+", out) and out != "steer "


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_states_each_default_once(name):
    module_name, config_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # an optional extra (the UI) that is not installed
        pytest.skip(f"{module_name}: {e}")
    parser = build_parser(getattr(module, config_name), prog=f"steer {name}", description=help_text)
    flat = " ".join(parser.format_help().split())
    for noise in ("(default: None)", "(default: [])", "(default: False)", "(default: )"):
        assert noise not in flat
    formatter = HelpFormatter(f"steer {name}")
    for action in parser._actions:
        shown = formatter._get_help_string(action)
        # A help text that already speaks of its default gets no second one appended.
        if "default" in (action.help or "").lower():
            assert shown == action.help, shown


def test_required_options_are_shown_as_required(capsys):
    module = importlib.import_module("steer.training.sft")
    parser = build_parser(module.SftConfig, prog="steer sft", description="")
    text = parser.format_help()
    usage = text.split("\n\n")[0]
    for flag in ("--base_model", "--data", "--output_dir"):
        assert not re.search(rf"\[{flag}[ \]]", usage) and re.search(rf"{flag}[ \]]", usage), flag
    required = text.split("required arguments:")[1].split("options:")[0]
    assert "--base_model" in required and "--output_dir" in required and "--format" not in required
    with pytest.raises(SystemExit) as exc:
        main(["sft", "--data", "x.jsonl"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "required: " in err and "--base_model/--base-model" in err and "--output_dir/--output-dir/--output" in err


def test_serve_ui_help_says_what_the_default_is():
    pytest.importorskip("fastapi")
    module = importlib.import_module("steer.service.cli")
    text = " ".join(build_parser(module.ServeConfig, prog="steer serve", description="").format_help().split())
    ui_help = text.split("--ui [UI]")[-1].split("--no_ui")[0]  # the help entry, not the usage line
    assert "(the default)" in ui_help and "(default: False)" not in ui_help
