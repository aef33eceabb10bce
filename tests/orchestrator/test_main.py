"""orchestrator.__main__: `python -m orchestrator` is the camstudy command line, its exit status
the command's."""

import runpy
import sys

import pytest

from study.records import STAGE_NAMES


def run_as_main(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["camstudy", *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("orchestrator", run_name="__main__")
    return exit_.value.code


def test_help_lists_every_stage(monkeypatch, capsys):
    assert run_as_main(monkeypatch, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: camstudy")
    for stage in STAGE_NAMES:
        assert stage in out


def test_an_unknown_command_is_a_usage_error(monkeypatch, capsys):
    assert run_as_main(monkeypatch, "no-such-stage") == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_exit_status_is_what_the_command_returns(monkeypatch):
    seen = []

    def main():
        seen.append(list(sys.argv))
        return 3

    monkeypatch.setattr("orchestrator.cli.main", main)
    assert run_as_main(monkeypatch, "analyze", "configs/demo.yaml") == 3
    assert seen == [["camstudy", "analyze", "configs/demo.yaml"]]
