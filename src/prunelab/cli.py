"""Command line: ``prunelab run``, ``prunelab list``, ``prunelab study``, ``prunelab report``, ``prunelab export``.

Every ``RunConfig`` key is a flag (``sparsity`` -> ``--sparsity``, booleans also as ``--no-...``,
the option tables as repeated ``--model-option KEY=VALUE`` / ``--method-option KEY=VALUE``). Bad input
ends with one line naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__
from .errors import PrunelabError

EXIT_USAGE = 2
LISTABLE = ("models", "datasets", "methods", "configs")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise PrunelabError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> argparse.ArgumentParser:
    from .lab.config import FIELDS, HELP, field_kind

    parser = _Parser(prog="prunelab", description="Neural-network pruning lab.")
    parser.add_argument("--version", action="version", version=f"prunelab {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser,
                                     metavar="{run,list,plot,figure,study,report,export}")

    run = commands.add_parser(
        "run", help="train / prune / evaluate one configuration",
        description="Run one configuration: flags override the keys of an optional TOML config file. "
                    "A run folder that already holds this config resumes where it stopped.")
    run.add_argument("config", nargs="?", help="TOML config file (keys as the flags below), or the name of a "
                                               "shipped config (prunelab list configs), e.g. quickstart")
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = field_kind(name)
        if kind is dict:
            run.add_argument(flag.removesuffix("s"), dest=name, action="append", metavar="KEY=VALUE",
                             default=argparse.SUPPRESS, help=HELP[name])
        elif kind is bool:
            run.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                             help=HELP[name])
        else:
            metavar = "N,N,..." if kind is list else kind.__name__.upper()
            run.add_argument(flag, dest=name, metavar=metavar, default=argparse.SUPPRESS, help=HELP[name])
    from .methods import get_method, method_flags
    for option, names in method_flags().items():  # one flag per option name, shared by the methods that have it
        helps = "; ".join(f"{n}: {get_method(n).options.help(option)}" for n in names)
        run.add_argument(f"--{option.replace('_', '-')}", dest=option, metavar="VALUE", default=argparse.SUPPRESS,
                         help=f"method option {option} ({helps})")
    run.add_argument("--quiet", action="store_true", help="print only the result table")
    run.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="train data-parallel on N processes of this machine (one per GPU with --device cuda): "
                          "launches torchrun (docs/distributed.md); not a config key")

    listing = commands.add_parser("list", help="list models, datasets or methods")
    listing.add_argument("what", choices=LISTABLE)

    plot = commands.add_parser("plot", help="plot test error against compression ratio of runs (PNG)",
                               description="Plot the pruning trajectory (every pruning phase) of one or "
                                           "more run folders, finished or still running.")
    plot.add_argument("runs", nargs="+", help="run folders")
    plot.add_argument("--out", default="trajectory.png", help="PNG file to write (default: trajectory.png)")

    from . import figures
    figures.add_arguments(commands.add_parser("figure", help="paper figures (snip: SNIP's per-pixel "
                                                             "retained connections, PNG)"))
    _add_study_commands(commands)
    export = commands.add_parser(
        "export", help="export a finished run's model: ONNX (checked with ONNX Runtime) or torch.export",
        description="Export the final model of a finished run folder (its compact model when the run made "
                    "one, else the masked model with its masks folded in) and check the file against PyTorch "
                    "(docs/export.md).")
    export.add_argument("run_dir", help="a finished run folder (holds config.toml and model.safetensors)")
    export.add_argument("--format", default="onnx", choices=("onnx", "torch", "sparse"),
                        help="onnx (default; needs the onnx extra) | torch (a torch.export .pt2 archive) | "
                             "sparse (the masked model's kept values and bitmasks: prunelab.sparse)")
    export.add_argument("--out", default=None, help="file to write (default: RUN_DIR/model.onnx or "
                                                    "RUN_DIR/compact.onnx, .pt2 for torch)")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    return parser


def _add_study_commands(commands) -> None:
    study = commands.add_parser(
        "study", help="run a study: methods x targets x seeds (x models, datasets) as lab runs",
        description="Run every missing run of a study file (docs/studies.md) into the study folder: finished "
                    "runs are reused, interrupted ones resume, failed ones are recorded in study.json. "
                    "Writes report.md at the end.")
    study.add_argument("study", help="study file (TOML)")
    study.add_argument("--out", help="study folder (default: the study file's path without .toml)")
    study.add_argument("--engine", default="local", help="local (default) | ray")
    study.add_argument("--workers", type=int, default=1, help="local engine: processes (1: this process)")
    study.add_argument("--threads", type=int, default=None,
                       help="torch threads per run (default: $OMP_NUM_THREADS, else the CPU count / workers; "
                            "ray: 1)")
    study.add_argument("--address", default=None, help="ray: the cluster's address (e.g. auto, HOST:6379, "
                                                       "ray://HOST:10001; default: RAY_ADDRESS, else a local Ray)")
    study.add_argument("--retry-failed", action="store_true", help="run diverged and failed runs again")
    study.add_argument("--adopt", action="append", default=[], metavar="DIR",
                       help="take finished lab runs of this study's configs from DIR (searched recursively; "
                            "copied, not moved) instead of running them; repeatable")
    study.add_argument("--dry-run", action="store_true", help="list the runs and their status; run nothing")
    study.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    study.add_argument("--quiet", action="store_true", help="no progress bar")
    report = commands.add_parser("report", help="report.md with plots and tables of a study folder",
                                 description="Write STUDY_DIR/report.md and its PNG plots from study.json and "
                                             "the runs' result.json files.")
    report.add_argument("study_dir", help="study folder (holds study.json)")
    report.add_argument("--references", default=None,
                        help="the papers' numbers (TOML; default: the study file's references)")


def _study(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path

    from .study import runner

    if args.dry_run:
        from .study.record import StudyRecord
        spec, planned, folder = runner.plan_study(args.study, args.out)
        record = StudyRecord(folder, spec, planned)
        for run in planned:
            entry = record.runs[run.id]
            print(f"{entry['status']:<9} {run.describe():<48} {folder / run.folder}")
        print(", ".join(f"{n} {status}" for status, n in record.counts().items() if n) + f" of {len(planned)} runs")
        return 0
    if args.engine == "ray" and args.threads is None:
        args.threads = 1

    def stop(_signum, _frame):  # SIGTERM (a scheduler, kill): the same orderly stop as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        data = runner.run_study(args.study, args.out, engine=args.engine, workers=args.workers,
                                threads=args.threads, address=args.address, retry_failed=args.retry_failed,
                                adopt_from=tuple(args.adopt), progress=not args.quiet)
    finally:
        signal.signal(signal.SIGTERM, previous)
    folder = Path(args.out) if args.out else runner.default_folder(args.study)
    print(runner.summary_line(data, folder))
    if not args.no_report:
        from .study import write_report
        print(f"wrote {write_report(folder)}")
    return 0


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from . import distributed
    from .lab.run import format_result, run

    config = _run_config(args)
    if args.nproc is not None and args.nproc != 1:  # one process: this one
        return _launch(config, args.nproc, argv)
    if args.quiet:
        result = run(config, progress=False, echo=None)
        if distributed.is_main():
            print(format_result(result))
    else:
        run(config)
    return 0


def _launch(config, nproc: int, argv: Sequence[str]) -> int:
    """``prunelab run --nproc N ...``: the same command without --nproc, on N processes under torchrun
    (standalone rendezvous on a free port of this machine). The config is checked here first, so bad input
    ends in one line before any process starts; torchrun's own report of a failed process is left out."""
    import os
    import re
    import signal
    import subprocess

    from . import distributed
    from .lab.run import resolve

    if nproc < 1:
        raise PrunelabError(f"--nproc must be >= 1, got {nproc}")
    if distributed.launched():
        raise PrunelabError("--nproc launches torchrun; this process already runs under a launcher (WORLD_SIZE "
                            "is set): leave --nproc out")
    resolved = resolve(config)
    if resolved.device.startswith("cuda") and ":" in resolved.device and nproc > 1:
        raise PrunelabError(f"device {resolved.device} names one GPU; with --nproc {nproc} give --device cuda "
                            "(one GPU per process)")
    rest = _without_nproc(argv)
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # else torchrun sets 1, with a banner
        env["OMP_NUM_THREADS"] = str(config.threads or max(1, (os.cpu_count() or 1) // nproc))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "prunelab", *rest]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    # SIGTERM (a scheduler, kill): passed to torchrun, which stops the workers (checkpoints stay)
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    failed = None  # the first failed worker's exit status, from torchrun's report
    own_log = re.compile(rb"^[DIWEF]\d{4} [\d:.]+ +\d+ .*torch/distributed/")  # torchrun's log records
    try:
        for line in iter(process.stderr.readline, b""):  # the workers' stderr passes; torchrun's own not
            found = re.search(rb"failed \(exitcode: (-?\d+)\)", line)
            if failed is None and (found or b"ChildFailedError" in line):
                failed = int(found.group(1)) if found else 1
            if failed is None and not own_log.match(line):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # torchrun got the interrupt too, and stops the workers
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code and failed is not None and failed > 0:
        return failed  # 2: a PrunelabError, which rank 0 printed in one line
    return code


def _without_nproc(argv: Sequence[str]) -> list[str]:
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    return rest


def _run_config(args: argparse.Namespace):
    from .lab.config import defaults, fold_method_flags, make_config, option_value, read_toml
    from .methods import method_flags

    values = defaults()
    if args.config:
        values.update(read_toml(args.config))
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet", "nproc")}
    cli_options = {entry.partition("=")[0].strip() for entry in given.get("method_options", [])}
    for name in ("model_options", "method_options"):
        if name in given:
            table = dict(values.get(name) or {})
            for entry in given.pop(name):
                key, sep, text = entry.partition("=")
                if not sep or not key:
                    raise PrunelabError(f"--{name.replace('_', '-').removesuffix('s')} takes KEY=VALUE, got {entry!r}")
                table[key.strip()] = option_value(text.strip())
            values[name] = table
    flags = method_flags()  # --lambda 1e-4 and the like: folded into method_options
    for key in [k for k in given if k in flags]:
        if key in cli_options:
            raise PrunelabError(f"method option {key} given twice: --{key.replace('_', '-')} and --method-option")
        (values.get("method_options") or {}).pop(key, None)  # the flag overrides the config file's table
    values.update({k: option_value(v) if k in flags else v for k, v in given.items()})
    values = fold_method_flags(values)
    if not values.get("model"):
        from .models import list_models
        raise PrunelabError("no model given: pass --model or a config file; models: "
                            + ", ".join(m.name for m in list_models()))
    return make_config(values)


def _export(args: argparse.Namespace) -> int:
    from .export import export, run_model

    model, dense, example, stem = run_model(args.run_dir)
    if args.format == "sparse":  # the masked model (before any compaction), lossless
        from .sparse import save_sparse

        out = args.out or f"{args.run_dir.rstrip('/')}/model.sparse.safetensors"
        written = save_sparse(out, model if dense is None else dense)
        print(f"wrote {out} (sparse, {written['bytes']:,} bytes)")
        return 0
    out = args.out or f"{args.run_dir.rstrip('/')}/{stem}.{'onnx' if args.format == 'onnx' else 'pt2'}"
    report = export(model, example, out, format=args.format, opset=args.opset, dense=dense)
    print(report.line())
    return 0


def _list(what: str) -> int:
    if what == "models":
        from .models import list_models
        for m in list_models():
            options = ", ".join(f"{k}" for k in m.options) or "-"
            print(f"{m.name:<16} {m.default_dataset:<14} {m.description}  [options: {options}]")
    elif what == "datasets":
        from .data import list_datasets
        for d in list_datasets():
            shape = "x".join(map(str, d.input_shape))
            print(f"{d.name:<14} {shape:<8} {d.num_classes:>3} classes  {d.description}")
    elif what == "configs":
        from .lab.config import find_config, list_configs
        for name in list_configs():
            print(f"{name:<24} {find_config(name)}")
    else:
        from .pruning import list_methods
        for m in list_methods():
            targets = ",".join(m.targets) or "its own"
            print(f"{m.name:<12} scope={m.scope:<7} when={m.when:<8} target={targets:<18} {m.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "run":
            return _run(args, argv)
        if args.command == "list":
            return _list(args.what)
        if args.command == "plot":
            from .lab.plots import plot_trajectory
            print(f"wrote {plot_trajectory(args.runs, args.out)}")
            return 0
        if args.command == "figure":
            from . import figures
            return figures.run_cli(args)
        if args.command == "study":
            return _study(args)
        if args.command == "export":
            return _export(args)
        if args.command == "report":
            from .study import write_report
            print(f"wrote {write_report(args.study_dir, args.references)}")
            return 0
        _build_parser().print_help()
        return EXIT_USAGE
    except PrunelabError as error:
        from . import distributed
        if distributed.is_main():  # the ranks of a distributed run stop together: rank 0 says why, once
            print(f"prunelab: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prunelab: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        if "prunelab.distributed" in sys.modules:  # a distributed run's process leaves its group
            sys.modules["prunelab.distributed"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
