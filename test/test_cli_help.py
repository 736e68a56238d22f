"""Every option of every command documents itself: walks the argparse parsers of ``spark3r``
(map, calibrate, bench, eval) and of ``python -m spark3r.offline.benchmark`` and fails on an
option or positional without a help text."""
import argparse

import pytest

from spark3r.cli import COMMANDS, build_parser
from spark3r.offline import benchmark


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:  # argparse has no public walk over its actions
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not (action.help and action.help.strip()) or action.help == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings) or action.dest)
    return missing


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_has_a_help_text(command):
    parser = _subcommands(build_parser())[command]
    assert _undocumented(parser) == [], f"spark3r {command}: options without a help text"
    assert "--" in parser.format_help()  # renders (a stray % in a help text would raise here)


def test_every_command_is_walked():
    assert set(_subcommands(build_parser())) == set(COMMANDS) >= {"map", "calibrate", "bench", "eval"}


def test_benchmark_writer_cli_is_documented_and_takes_out(tmp_path, capsys):
    parser = benchmark.build_parser()
    assert _undocumented(parser) == []
    with pytest.raises(SystemExit):  # the output folder is a named option, not a word that reads like a command
        parser.parse_args(["bench"])
    assert benchmark.main(["--out", str(tmp_path / "b"), "--frames", "3", "--height", "24", "--width", "32"]) == 0
    assert (tmp_path / "b" / "sequence.bag").is_dir() and (tmp_path / "b" / "tum" / "rgb.txt").is_file()
    assert "sequence.bag" in capsys.readouterr().out
