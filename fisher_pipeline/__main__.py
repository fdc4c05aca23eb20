"""Command-line entry points the workflow rules call (`python -m fisher_pipeline ...`).

Each subcommand takes the workflow config as JSON (what the workflow passes) or as a YAML
file, validates it against the config schema and calls the phase's plain function. A
mistake in the input (a bad config, a missing file, ...) ends with one line naming the
input and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import FisherPipelineError


def _load_config(args: argparse.Namespace):
    from .config import RUN_SETTING_KEYS, PipelineConfig, parse_config_json, read_config_file
    from .errors import ConfigError

    raw = parse_config_json(args.config_json) if args.config_json is not None else read_config_file(args.config)
    run_settings = getattr(args, "run_settings_json", None)
    if run_settings is not None:
        extra = parse_config_json(run_settings, "--run-settings-json")
        unknown = sorted(set(extra) - set(RUN_SETTING_KEYS))
        if unknown:
            raise ConfigError(f"--run-settings-json takes only the fisher keys {', '.join(RUN_SETTING_KEYS)} "
                              f"(got {', '.join(unknown)}): put other keys in the config")
        raw = {**raw, "fisher": {**(raw.get("fisher") or {}), **extra}}
    return PipelineConfig.from_dict(raw)


def _cmd_prepare_model(args: argparse.Namespace) -> None:
    from .models.loading import prepare_bundled_model

    print(prepare_bundled_model(args.out))


def _cmd_fisher(args: argparse.Namespace) -> None:
    config = _load_config(args)  # before importing torch: a config mistake is reported at once

    import torch

    from .fisher import run_fisher

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.sample_shard is None and args.param_shard is None:
        print(run_fisher(config, args.task, args.out, progress=not args.quiet, heldout=args.heldout))
        return
    if args.heldout:
        from .errors import ConfigError

        raise ConfigError("--heldout writes one store per task in one job: drop --sample-shard/--param-shard")
    from .fisher import run_fisher_shard

    print(run_fisher_shard(config, args.task, args.out, sample_shard=args.sample_shard or (0, 1),
                           param_shard=args.param_shard or (0, 1), progress=not args.quiet))


def _cmd_fisher_merge(args: argparse.Namespace) -> None:
    config = _load_config(args)
    from .errors import ConfigError
    from .fisher import phase1_config_hash
    from .shards import merge_shards

    if args.task not in config.tasks:
        raise ConfigError(f"task {args.task!r} is not in the config; its tasks are: "
                          f"{', '.join(config.tasks) or 'none'}")
    print(merge_shards(args.shards, args.out, task=args.task, config_hash=phase1_config_hash(config, args.task)))


def _cmd_schema(args: argparse.Namespace) -> None:
    from .config import config_schema

    print(json.dumps(config_schema(), indent=2))


def _cmd_config_docs(args: argparse.Namespace) -> None:
    from .config_docs import update
    from .errors import ConfigError

    current = update(args.path, check=args.check)
    if args.check and not current:
        raise ConfigError(f"{args.path} is not current with the config schema: run `python -m fisher_pipeline "
                          f"config-docs` and commit the result")
    print(f"{args.path}: {'current' if current else 'rewritten from the schema'}")


def _cmd_download_model(args: argparse.Namespace) -> None:
    from .errors import ModelLoadError
    from .models.hub import is_hub_id, resolve

    if not is_hub_id(args.repo_id):
        raise ModelLoadError(f"{args.repo_id!r} is not a hub id org/name (or it is a local path already)")
    print(resolve(args.repo_id, args.revision, download=True))


def _cmd_verify(args: argparse.Namespace) -> None:
    import time

    from .errors import StoreFormatError
    from .store import verify_store

    damaged = []
    for path in args.paths:
        started = time.perf_counter()
        report = verify_store(path, threads=args.threads)
        seconds = time.perf_counter() - started
        if report.ok:
            print(f"{path}: ok ({report.files:,} files, {report.bytes / 1e9:.2f} GB checked in {seconds:.1f} s)")
            continue
        damaged.append(str(path))
        print(f"{path}: DAMAGED, {len(report.problems)} problem(s):")
        for problem in report.problems[:20]:
            print(f"  {problem}")
        if len(report.problems) > 20:
            print(f"  ... and {len(report.problems) - 20} more")
    if damaged:
        raise StoreFormatError(f"{len(damaged)} of {len(args.paths)} store(s) damaged ({', '.join(damaged)}): "
                               "rerun phase 1 for their tasks (remove each damaged store; the workflow writes "
                               "it again)")


def _cmd_plan(args: argparse.Namespace) -> None:
    from .config import PipelineConfig, read_config_file
    from .planner import plan_run, precision_tables, render_plan, samples_needed_rows, table, this_machine

    config = PipelineConfig.from_dict(read_config_file(args.configfile))
    plan = plan_run(config)
    print(render_plan(config, plan, this_machine(plan.on_gpu, config.plan)))
    print(f"\nsamples per task for a relative standard error of {args.target:g} of the head / neuron Fisher:")
    tables = precision_tables(args.results, config.tasks)
    if not tables:
        print(f"  no precision table under {args.results}/importance/*/precision.csv yet: run phase 2 on a first "
              "run's stores (`snakemake --cores 2 results/importance/TASK`), then ask again")
        return
    print(table(["task", "unit", "N", "relative SE, median", "p90", "samples needed, median", "p90"],
                samples_needed_rows(tables, args.target)))
    missing = sorted(set(config.tasks) - set(tables))
    if missing:
        print(f"(no precision table yet for: {', '.join(missing)})")


def _target(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a relative standard error between 0 and 1 (e.g. 0.05)")
    return value


def _threads(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0 (0: torch's default)")
    return int(text)


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r} is not INDEX/COUNT with 0 <= INDEX < COUNT (e.g. 0/4)")
    return int(index), int(count)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="workflow config YAML (e.g. config/config.yaml)")
    source.add_argument("--config-json", help="workflow config as a JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fisher_pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    prepare = sub.add_parser("prepare-model", help="convert the bundled SmolLM2 GGUF to a safetensors folder")
    prepare.add_argument("--out", required=True, help="output folder")
    prepare.set_defaults(func=_cmd_prepare_model)

    fisher = sub.add_parser("fisher", help="phase 1: per-sample gradients and Fisher store of one task")
    _add_config_args(fisher)
    fisher.add_argument("--run-settings-json", metavar="JSON",
                        help="fisher keys that say how the job runs, not what it stores (state_device, "
                             "fold_kernel), as a JSON object over the config's: the workflow passes them apart, "
                             "so that editing them reruns nothing")
    fisher.add_argument("--task", required=True, help="task name (a key of the config's 'tasks')")
    fisher.add_argument("--out", required=True, help="store path, e.g. results/fisher/prose.zarr")
    fisher.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: torch default)")
    fisher.add_argument("--quiet", action="store_true", help="no progress bar")
    fisher.add_argument("--heldout", action="store_true",
                        help="store the task's n_heldout held-out samples (after the analysed ones), for the "
                             "held-out checks of phases 5 to 7")
    fisher.add_argument("--sample-shard", type=_shard, metavar="k/K",
                        help="write the partial store of sample shard k of K (of parameter share 0/1 unless "
                             "--param-shard): see fisher-merge")
    fisher.add_argument("--param-shard", type=_shard, metavar="p/P",
                        help="accumulate and store only parameter share p of P (partial store)")
    fisher.set_defaults(func=_cmd_fisher)

    merge = sub.add_parser("fisher-merge", help="phase 1: merge the partial stores of a task's shards into its store")
    _add_config_args(merge)
    merge.add_argument("--task", required=True, help="task name (a key of the config's 'tasks')")
    merge.add_argument("--shards", required=True, nargs="+", metavar="PATH",
                       help="the partial stores of every shard of the task (any order)")
    merge.add_argument("--out", required=True, help="store path, e.g. results/fisher/prose.zarr")
    merge.set_defaults(func=_cmd_fisher_merge)

    download = sub.add_parser("download-model", help="fill the HuggingFace cache with a hub model's safetensors "
                                                     "weights, configs and tokenizer (the one online step)")
    download.add_argument("repo_id", metavar="ORG/NAME", help="hub id, e.g. Qwen/Qwen2.5-0.5B")
    download.add_argument("--revision", help="branch, tag or commit (default: main)")
    download.set_defaults(func=_cmd_download_model)

    verify = sub.add_parser("verify", help="check every file of phase 1 stores (or shards) against their "
                                           "integrity record")
    verify.add_argument("paths", nargs="+", metavar="PATH", help="store folders, e.g. results/fisher/*.zarr")
    verify.add_argument("--threads", type=_threads, default=2, help="files checked at once (default 2)")
    verify.set_defaults(func=_cmd_verify)

    plan = sub.add_parser("plan", help="what each job of a run needs (memory, disk, time, shards), from the "
                                       "model's shapes; and samples per task for a target precision")
    plan.add_argument("--configfile", default="config/config.yaml",
                      help="workflow config YAML, as snakemake takes it (default: config/config.yaml)")
    plan.add_argument("--target", type=_target, default=0.05,
                      help="relative standard error of the head / neuron Fisher to size samples for (default 0.05)")
    plan.add_argument("--results", default="results", help="the run's results folder (phase 2's precision tables)")
    plan.set_defaults(func=_cmd_plan)

    schema = sub.add_parser("schema", help="print the config's JSON schema (every section, with defaults)")
    schema.set_defaults(func=_cmd_schema)

    docs = sub.add_parser("config-docs", help="rewrite config/README.md's key tables from the config schema")
    docs.add_argument("--path", default="config/README.md", help="the page holding the tables")
    docs.add_argument("--check", action="store_true", help="only check that the tables are current (exit 2 if not)")
    docs.set_defaults(func=_cmd_config_docs)

    from .phases.cli import add_phase_commands

    add_phase_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except FisherPipelineError as err:
        logging.getLogger("fisher_pipeline").error("%s", str(err).replace("\n", " "))
        return 2
    except OSError as err:  # a path that cannot be read or written (a file where a folder should be, ...)
        where = f" {err.filename}" if err.filename else ""
        logging.getLogger("fisher_pipeline").error("cannot create or open%s: %s", where, err.strerror or err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
