"""``dist-train launch``: start training under torchrun (``local``) or SLURM via submitit (``slurm``).

Both hand the same CONFIG and dotted overrides to ``dist_train.train.run`` on every rank. The
adapters (and submitit) are imported only when their sub-command runs.
"""

from __future__ import annotations

import argparse
import sys


def add_launch_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``launch local`` and ``launch slurm``; each sets ``func(args) -> int``."""
    parser = subparsers.add_parser("launch", help="run training under torchrun or SLURM",
                                   description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    _add_local(commands)
    _add_slurm(commands)
    return parser


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (optional)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=0.1, anywhere among the options")
    p.add_argument("--dry-run", action="store_true", help="check the config and print what would run, then stop")


def _add_local(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("local", help="torchrun on this machine (or every node of a c10d rendezvous)",
                            description="Wrap torchrun: --nproc ranks here; with --nnodes and --rdzv-endpoint, "
                                        "run the same command on every node.")
    _add_run_args(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes taking part (needs --rdzv-endpoint when > 1)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="c10d rendezvous on one of the nodes")
    p.add_argument("--rdzv-id", default="dist_train", help="rendezvous id, the same on every node of one run")
    p.add_argument("--max-restarts", type=int, default=0, help="restart failed ranks this often (they resume)")
    p.set_defaults(func=_run_local)


def _add_slurm(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("slurm", help="submit to SLURM through submitit (sweeps become job arrays)",
                            description="Submit one job (or a job array for a sweep). Each task runs the trainer; "
                                        "on preemption or time-out the job is requeued and resumes.")
    _add_run_args(p)
    res = p.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0 makes a CPU job")
    res.add_argument("--tasks-per-node", type=int, default=None, help="CPU jobs: ranks per node (default 1)")
    res.add_argument("--cpus-per-task", type=int, default=None)
    res.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    res.add_argument("--partition", default=None)
    res.add_argument("--time", type=int, default=60, metavar="MINUTES", help="wall-clock limit per attempt")
    res.add_argument("--max-requeues", type=int, default=3, help="requeues after time-outs (preemption is free)")
    res.add_argument("--job-name", default="dist_train")
    res.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                     help="extra sbatch option, repeatable: --sbatch account=vision --sbatch exclusive")
    sweep = p.add_argument_group("sweeps (one job array)")
    sweep.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="grid axis, repeatable; the runs are the cartesian product")
    sweep.add_argument("--sweep-override-set", action="append", default=[], metavar="'K=V K=V'",
                       help="one run's overrides, repeatable; an explicit list instead of a grid")
    p.add_argument("--folder", default="runs/slurm/%j", help="submitit folder: job pickles and logs (%%j = job id)")
    p.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="auto: SLURM when its commands exist; local: submitit's local executor, no SLURM")
    p.add_argument("--wait", action="store_true", help="follow the jobs to the end; non-zero exit if one failed")
    p.set_defaults(func=_run_slurm)


def _run_local(args: argparse.Namespace) -> int:
    from dist_train.config import check, load_config
    from dist_train.launch.local import run_torchrun, torchrun_command

    try:  # fail here, before torchrun starts, rather than once per rank
        check(load_config(args.config, args.overrides), world_size=args.nproc * args.nnodes)
        cmd = torchrun_command(args.config, args.overrides, nproc_per_node=args.nproc, nnodes=args.nnodes,
                               rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                               max_restarts=args.max_restarts)
    except ValueError as err:
        return _usage_error(err)
    if args.dry_run:
        import shlex

        print(shlex.join(cmd))
        return 0
    return run_torchrun(cmd)


def _run_slurm(args: argparse.Namespace) -> int:
    from dist_train.launch import slurm
    from dist_train.launch.sweep import sweep_members

    try:
        resources = slurm.SlurmResources(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
            cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, partition=args.partition, time_min=args.time,
            max_requeues_on_timeout=args.max_requeues, job_name=args.job_name, sbatch=_parse_sbatch(args.sbatch))
        members = sweep_members(grid=args.sweep, override_sets=args.sweep_override_set)
        jobs = slurm.plan_jobs(args.config, args.overrides, members=members, world_size=resources.world_size)
        if args.dry_run:
            for job in jobs:
                print(f"{resources.world_size} ranks: {job.config_path or '(defaults)'} {' '.join(job.overrides)}")
            return 0
        executor = slurm.make_executor(args.executor, args.folder, resources)
    except ValueError as err:
        return _usage_error(err)
    handles = slurm.submit(executor, jobs)
    slurm.describe(handles, jobs)
    return slurm.follow(handles) if args.wait else 0


def _parse_sbatch(items: list[str]) -> dict[str, object]:
    """``["account=vision", "exclusive"]`` -> ``{"account": "vision", "exclusive": True}``."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ValueError(f"--sbatch {item!r}: expected KEY=VALUE or a bare flag such as exclusive")
        out[key.replace("-", "_")] = value if sep else True
    return out


def _usage_error(err: Exception) -> int:
    from dist_train.config import ConfigError

    kind = "dist-train: config error" if isinstance(err, ConfigError) else "dist-train launch: error"
    print(f"{kind}: {err}", file=sys.stderr)
    return 2
