"""Command-line entry points the workflow rules call (`python -m fisher_pipeline ...`).

Each subcommand takes the workflow config as JSON (already validated and filled with
defaults by Snakemake) or as a YAML file, and calls the phase's plain function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import FisherPipelineError


def _load_config(args: argparse.Namespace):
    from .config import PipelineConfig

    if args.config_json:
        raw = json.loads(args.config_json)
    else:
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text()) or {}
    return PipelineConfig.from_dict(raw)


def _cmd_prepare_model(args: argparse.Namespace) -> None:
    from .models.loading import prepare_bundled_model

    print(prepare_bundled_model(args.out))


def _cmd_fisher(args: argparse.Namespace) -> None:
    import torch

    from .fisher import run_fisher

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(run_fisher(_load_config(args), args.task, args.out, progress=not args.quiet))


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="workflow config YAML (e.g. config/config.yaml)")
    source.add_argument("--config-json", help="workflow config as a JSON string")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fisher_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare-model", help="convert the bundled SmolLM2 GGUF to a safetensors folder")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.set_defaults(func=_cmd_prepare_model)

    fisher = sub.add_parser("fisher", help="phase 1: per-sample gradients and Fisher store of one task")
    _add_config_args(fisher)
    fisher.add_argument("--task", required=True, help="task name (a key of the config's 'tasks')")
    fisher.add_argument("--out", required=True, help="store path, e.g. results/fisher/prose.zarr")
    fisher.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    fisher.add_argument("--quiet", action="store_true", help="no progress bar")
    fisher.set_defaults(func=_cmd_fisher)

    from .phases.cli import add_phase_commands

    add_phase_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FisherPipelineError as err:
        logging.getLogger("fisher_pipeline").error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
