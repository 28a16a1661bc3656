"""``dist-train``: the command line. Each sub-command lives with its concern and registers itself here."""

from __future__ import annotations

import argparse
import logging
import sys

from dist_train.config import ConfigError


def _train(args: argparse.Namespace) -> int:
    from dist_train.train import run

    summary = run(args.config, args.overrides)
    if summary.get("is_main") and "eval/acc1" in summary:
        ema = f" (EMA of the weights: {summary['eval/ema_acc1']:.4f})" if "eval/ema_acc1" in summary else ""
        print(f"final test accuracy: {summary['eval/acc1']:.4f}{ema}")
    return 0


def _print_config(args: argparse.Namespace) -> int:
    import yaml

    from dist_train.config import check, load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    check(cfg, world_size=args.world_size)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _import_tracking(args: argparse.Namespace) -> int:
    from dist_train.tracking import import_pending

    try:
        run_id = import_pending(args.pending_file, tracking_uri=args.tracking_uri)
    except (ValueError, ConnectionError) as err:  # not a pending file, a changed one, or no server
        print(f"dist-train: {err}", file=sys.stderr)
        return 1
    print(f"sent the queued records of {args.pending_file} to MLflow run {run_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import-tracking", help="send a run's queued MLflow records (mlflow-pending.jsonl)")
    p.add_argument("pending_file")
    p.add_argument("--tracking-uri", default=None, help="send to this store instead of the one recorded")
    p.set_defaults(func=_import_tracking)
    for name, func, text in (("train", _train, "train with a config and dotted overrides"),
                             ("config", _print_config, "print the resolved config")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", nargs="?", default=None, help="YAML file under configs/ (optional)")
        p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=0.1")
        p.set_defaults(func=func)
        if name == "config":
            p.add_argument("--world-size", type=int, default=None, metavar="N",
                           help="also check that every batch the schedule uses divides over N ranks")
    from dist_train.data.cli import add_make_shards_parser

    add_make_shards_parser(sub)
    from dist_train.backends.export import add_export_parser
    from dist_train.report import add_report_parser

    add_export_parser(sub)

    add_report_parser(sub)
    try:
        from dist_train.launch import add_launch_parser
    except ImportError:  # pragma: no cover - launch adapters not installed in this checkout
        pass
    else:
        add_launch_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling ``overrides`` at the first option, so ``launch local cfg.yaml a=1 --nproc 2 b=2``
    # leaves ``b=2`` over: a dotted override after an option belongs to the overrides, in order.
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # A config file given as the only positional may actually be an override (``train optim.lr=1``).
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides, args.config = [args.config, *args.overrides], None
    from dist_train.checkpoint import CheckpointError
    from dist_train.data.errors import ShardsNotFound, ShardVerificationError
    from dist_train.faults import PREEMPTED_EXIT_CODE, NonFiniteLoss, Preempted
    from dist_train.tracking import TrackingRefused

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"dist-train: config error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"dist-train: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (NonFiniteLoss, CheckpointError, ShardsNotFound, ShardVerificationError, TrackingRefused) as err:
        print(f"dist-train: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
