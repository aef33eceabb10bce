"""`camstudy` (also `python -m orchestrator`): one subcommand per stage.

Bad input raises a CamstudyError whose message names the file/row/key and the remedy; it is
printed on one line without a traceback and the command exits with status 2. Ctrl-C and
SIGTERM (what `ray job stop` sends) stop the command within seconds: runs in flight and the
study's MLflow parent are marked KILLED, Ray work is cancelled, and the same command resumes.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from study.errors import CamstudyError
from study.records import STAGE_NAMES

STAGE_HELP = {  # each stage command's help, and its --force's
    "prepare": ("build the manifest, split and preprocessing cache", "rebuild even when up to date"),
    "train": ("train every model x seed with Ray Train (resumes unfinished runs)",
              "retrain finished runs from scratch"),
    "explain": ("Grad-CAM extraction and scoring with Ray Data into Parquet", "redo finished extractions"),
    "analyze": ("tables, statistics, figures, MLflow and report.html", "redo the analysis even when up to date"),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C."""


_signals_received: list[int] = []  # Ray re-raises an interrupt inside ray.wait as a plain KeyboardInterrupt


def _on_sigterm(signum, frame):
    _signals_received.append(signum)
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.handler(args) or 0
    except CamstudyError as error:
        print(f"camstudy: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _stop_ray()
        terminated = signal.SIGTERM in _signals_received
        print(f"camstudy: {'terminated' if terminated else 'interrupted'}; finished work "
              "is kept: rerun the same command to resume", file=sys.stderr)
        return 143 if terminated else 130


def _stop_ray() -> None:
    """Shut down this driver's Ray (a local one stops with it; a cluster's tasks of this job end)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("camstudy")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camstudy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"camstudy {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from study.config import SyntheticData

    default = SyntheticData()  # the config's data.synthetic defaults, the one statement of them
    synth = commands.add_parser("synth", help="write a synthetic dataset in the SIIM stage-1 layout")
    synth.add_argument("--out", required=True, type=Path, help="output folder")
    synth.add_argument("--n", type=int, default=default.n, help=f"labelled images (default {default.n})")
    synth.add_argument("--size", type=int, default=default.size, help=f"image side in pixels (default {default.size})")
    synth.add_argument("--seed", type=int, default=default.seed)
    synth.add_argument("--contrast", type=float, default=default.contrast,
                       help=f"lesion contrast in [0, 1] (default {default.contrast})")
    synth.add_argument("--positive-fraction", type=float, default=default.positive_fraction)
    synth.add_argument("--lesion-scale", type=float, default=default.lesion_scale,
                       help="multiply lesion areas (1 = the real SIIM distribution)")
    synth.set_defaults(handler=_synth)

    for name in STAGE_NAMES:
        help_text, force_text = STAGE_HELP[name]
        stage = _stage(commands, name, help_text)
        stage.add_argument("--force", action="store_true", help=force_text)
        stage.set_defaults(handler=_run_stage, stage=name)
    run = _stage(commands, "run", "the whole study: prepare -> train -> explain -> analyze")
    run.add_argument("--force", choices=STAGE_NAMES,
                     help="redo this stage and every stage after it")
    run.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (overrides training.seeds)")
    run.set_defaults(handler=_run)
    fetch = _stage(commands, "fetch-weights", "download the pretrained weights a config needs (needs internet)")
    fetch.set_defaults(handler=_fetch_weights)
    tune = _stage(commands, "tune", "search each family's recipe with Ray Tune (ASHA on validation AUC)")
    tune.add_argument("--trials", type=int, default=8, help="trials per family (default 8)")
    tune.add_argument("--out", type=Path, required=True, help="the recipe file to write (YAML), for --recipes")
    tune.set_defaults(handler=_tune)
    return parser


def _stage(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    stage = commands.add_parser(name, help=help_text)
    stage.add_argument("config", type=Path, help="study config YAML, e.g. configs/demo.yaml")
    stage.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.seeds=[0,1,2] (repeatable)")
    stage.add_argument("--recipes", type=Path, metavar="FILE",
                       help="recipes chosen by `camstudy tune` (replace the config's for their families)")
    return stage


def _load(args, reads_data: bool = False):
    """The command's config, refused here when it cannot run, before the study folder, its lock or
    an MLflow run exists; `reads_data`: the command reads the images (data.root is checked too).
    Commands call this before importing the pipeline (Ray, MLflow, torch: many seconds), so a
    config that cannot run fails at once."""
    from study.config import load_config, parse_override, recipe_overrides
    from training.source import check_data_source

    overrides, given_as = {}, {}
    if getattr(args, "recipes", None):
        overrides = recipe_overrides(args.recipes)
        given_as = dict.fromkeys(overrides, f"--recipes {args.recipes}")
    for text in args.overrides:
        key, value = parse_override(text)
        overrides[key], given_as[key] = value, f"--set {_as_typed(text)}"
    if getattr(args, "seeds", None):
        overrides["training.seeds"], given_as["training.seeds"] = _seeds(args.seeds), f"--seeds {_as_typed(args.seeds)}"
    return load_config(args.config, overrides, given_as, checks=(check_data_source,) if reads_data else ())


def _as_typed(text: str) -> str:
    """An argument as typed, for an error line: quoted and cut where it would break or flood the line."""
    from study.errors import shown

    return text if len(text) <= 100 and text.isprintable() else shown(text)


def _seeds(text: str) -> list[int]:
    from study.errors import ConfigError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers such as 0,1,2") from None


def _synth(args) -> int:
    from training.synth import generate

    summary = generate(args.out, n=args.n, size=args.size, seed=args.seed, contrast=args.contrast,
                       positive_fraction=args.positive_fraction, lesion_scale=args.lesion_scale)
    print(summary)
    return 0


READS_DATA = ("prepare", "train")  # the stage commands that read the images (data.root is checked first)


def _run_stage(args) -> int:
    """`camstudy prepare|train|explain|analyze`: that stage (`orchestrator.stages.STAGES`); train
    first brings the prepared data up to date, as it reads it."""
    config = _load(args, reads_data=args.stage in READS_DATA)
    from orchestrator.pipeline import open_study
    from orchestrator.stages import STAGES

    with open_study(config) as (store, tracker):
        if args.stage == "train":
            STAGES["prepare"](config, store, tracker)
        STAGES[args.stage](config, store, tracker, force=args.force)
    return 0


def _run(args) -> int:
    config = _load(args, reads_data=True)
    from orchestrator.pipeline import open_study, run_study

    with open_study(config) as (store, tracker):
        run_study(config, store, tracker, force=args.force)
    return 0


def _tune(args) -> int:
    config = _load(args, reads_data=True)
    from orchestrator.pipeline import open_study
    from orchestrator.ray_setup import init_ray
    from orchestrator.stages import STAGES
    from orchestrator.tune import tune_recipes

    with open_study(config) as (store, tracker):
        STAGES["prepare"](config, store, tracker)
        init_ray(config)
        tune_recipes(config, store, tracker, args.trials, args.out.resolve())
    return 0


def _fetch_weights(args) -> int:
    config = _load(args)
    from training.weights import fetch_weights

    for line in fetch_weights(config):
        print(line)
    return 0
