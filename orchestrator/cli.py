"""`camstudy` (also `python -m orchestrator`): one subcommand per stage.

Bad input raises a CamstudyError whose message names the file/row/key and the remedy; it is
printed on one line without a traceback and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.errors import CamstudyError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except CamstudyError as error:
        print(f"camstudy: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camstudy: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camstudy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a synthetic dataset in the SIIM stage-1 layout")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--n", type=int, default=400, help="labelled images (default 400)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--contrast", type=float, default=0.5, help="lesion contrast in [0, 1] (default 0.5)")
    synth.add_argument("--positive-fraction", type=float, default=0.5)
    synth.set_defaults(handler=_synth)

    prepare = _stage(commands, "prepare", "build the manifest, split and preprocessing cache")
    prepare.set_defaults(handler=_prepare)
    return parser


def _stage(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    stage = commands.add_parser(name, help=help_text)
    stage.add_argument("config", type=Path, help="study config YAML, e.g. configs/demo.yaml")
    stage.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.seeds=[0,1,2] (repeatable)")
    return stage


def _load(args):
    from orchestrator.config import load_config, parse_override

    return load_config(args.config, dict(parse_override(text) for text in args.overrides))


def _synth(args) -> int:
    from training.synth import generate

    summary = generate(args.out, n=args.n, size=args.size, seed=args.seed, contrast=args.contrast,
                       positive_fraction=args.positive_fraction)
    print(summary)
    return 0


def _prepare(args) -> int:
    from orchestrator.stages import prepare_stage

    prepare_stage(_load(args))
    return 0
