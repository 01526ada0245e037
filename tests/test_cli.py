"""The two commands' surfaces: --version, --help (plain text, every option explained with its
default), and kvpress-calibrate's per-method sub-command registry."""

import argparse
import sys
import types

import pytest

import kvpress
from kvpress.calibration import cli as calibrate_cli
from kvpress.eval import cli as eval_cli


def parsers():
    calibrate = calibrate_cli.build_parser()
    subparsers = next(a for a in calibrate._actions if isinstance(a, argparse._SubParsersAction))
    return {"kvpress-eval": eval_cli.build_parser(), "kvpress-calibrate": calibrate,
            **{f"kvpress-calibrate {name}": sub for name, sub in subparsers.choices.items()}}


@pytest.mark.parametrize("main", [eval_cli.main, calibrate_cli.main], ids=["eval", "calibrate"])
def test_version(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f"(kvpress {kvpress.__version__})")


def test_help_is_plain_text_and_every_option_has_help_and_default():
    found = parsers()
    assert "kvpress-calibrate duo" in found
    for prog in ("kvpress-eval", "kvpress-calibrate", "kvpress-calibrate duo"):  # each method's module: its own tests
        parser = found[prog]
        text = parser.format_help()
        assert "`" not in text and "``" not in text, prog  # no Markdown / RST markup
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{prog} {action.option_strings} has no help"
            shown = parser._get_formatter()._get_help_string(action)
            if action.required:
                assert "required" in shown, (prog, action.option_strings)
            elif not isinstance(action, argparse._StoreTrueAction):
                assert "default" in shown, (prog, action.option_strings, shown)


def test_train_window_options_say_they_are_not_the_deployed_window():
    duo = parsers()["kvpress-calibrate duo"]
    helps = {a.option_strings[0]: a.help for a in duo._actions if a.option_strings}
    assert "TRAINING ONLY" in helps["--train-sink"] and "not the deployed --sink" in helps["--train-sink"]
    assert "TRAINING ONLY" in helps["--train-recent"] and "deployed" in helps["--sink"]


def test_subcommands_are_registered_per_method_module(monkeypatch, capsys):
    fake = types.ModuleType("kvpress.calibration.fake")
    fake.HELP = "a fake method"
    fake.add_arguments = lambda parser: parser.add_argument("--level", type=int, default=3, help="a level")
    fake.main = lambda args: args.level
    monkeypatch.setitem(sys.modules, "kvpress.calibration.fake", fake)
    monkeypatch.setattr(calibrate_cli, "METHODS", ("duo", "fake", "not_written_yet"))
    assert set(calibrate_cli.method_modules()) == {"duo", "fake"}  # a missing module is left out
    assert calibrate_cli.main(["fake", "--level", "7"]) == 7
    assert "a fake method" in calibrate_cli.build_parser().format_help()

    real_import = calibrate_cli.importlib.import_module

    def import_module(name):
        if name.endswith(".broken"):  # a module that exists but fails to import
            raise ImportError("cannot import name 'thing' from 'somewhere'")
        return real_import(name)

    monkeypatch.setattr(calibrate_cli.importlib, "import_module", import_module)
    monkeypatch.setattr(calibrate_cli, "METHODS", ("duo", "broken"))
    assert calibrate_cli.main(["broken"]) == 2
    assert "the broken calibration could not be loaded (ImportError: cannot import name" in capsys.readouterr().err


def test_calibrate_duo_stays_importable_from_the_cli_module():
    from kvpress.calibration.cli import calibrate_duo
    from kvpress.calibration.duo import calibrate_duo as same

    assert calibrate_duo is same
