"""``dist-train export CKPT OUT``: a checkpoint's model weights as a plain fp32 state_dict.

The output loads with ``torch.load(OUT, weights_only=True)`` and ``model.load_state_dict`` without
dist_train, DeepSpeed or the number of ranks that trained it; use it for evaluation and other tools.

- A DDP checkpoint (``backend.pt`` in the directory) holds the whole model: its ``model`` entry.
- A DeepSpeed ZeRO-1/2 checkpoint holds the fp32 master weights in per-rank partitions:
  DeepSpeed's ``zero_to_fp32`` joins them. A ZeRO-0 checkpoint holds the module as trained.

With Lookahead the trainer evaluates the slow weights, and the checkpoint also holds them as a model
state_dict (``model-slow.pt``). ``--weights evaluated``, the default, exports those when they are there
and the trained weights otherwise; ``fast`` always exports the trained (fast) weights, ``slow`` only
the slow ones. With ``train.ema_decay`` the checkpoint also holds the EMA of the weights (``model-ema.pt``),
which the trainer evaluates beside them as ``eval/ema_*``: ``--weights ema`` exports it.

Every file is read weights-only, DeepSpeed's too (``checkpoint.weights_only_loading``): a checkpoint that
holds other pickled objects is refused unless ``--trust-pickle`` says it comes from a trusted source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dist_train.backends.base import BACKEND_FILE as DDP_FILE
from dist_train.backends.capabilities import SLOW_MODEL_FILE
from dist_train.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointError,
    load_tensor_file,
    save_tensor_file,
    weights_only_loading,
)
from dist_train.ema import EMA_MODEL_FILE
from dist_train.files import replaced_atomically

WEIGHTS = ("evaluated", "fast", "slow", "ema")


def export_state_dict(checkpoint_path_or_dir: str | Path, out_path: str | Path, *, weights: str = "evaluated",
                      trust_pickle: bool = False) -> Path:
    """Write the model state_dict of the checkpoint at ``checkpoint_path_or_dir`` to ``out_path``."""
    state = model_state_dict(checkpoint_path_or_dir, weights=weights, trust_pickle=trust_pickle)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out) as tmp:
        save_tensor_file(state, tmp)
    return out


def model_state_dict(checkpoint_path_or_dir: str | Path, *, weights: str = "evaluated",
                     trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 model state_dict held by a checkpoint directory (DDP or DeepSpeed) or a ``backend.pt``.

    ``weights``: ``evaluated`` (Lookahead's slow weights where the checkpoint has them, else the trained
    ones), ``fast`` (the trained weights), ``slow`` (an error without Lookahead) or ``ema`` (the EMA of the
    weights; an error without ``train.ema_decay``). ``trust_pickle``: let DeepSpeed's files unpickle in full
    (refused by default)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    path = Path(checkpoint_path_or_dir)
    if path.is_file() and path.name == DDP_FILE:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory (step-NNNNNNNN/)")
    if (path / MANIFEST).is_file():  # written by dist_train: check every file against its sha256 first
        Checkpointer(path.parent, keep_last=1, rank=0, world_size=1).verify(path)
    if weights == "slow" and not (path / SLOW_MODEL_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} has no Lookahead slow weights ({SLOW_MODEL_FILE}): it was "
                              f"trained without optim.lookahead; export --weights fast (or evaluated)")
    if weights == "ema" and not (path / EMA_MODEL_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} has no EMA of the weights ({EMA_MODEL_FILE}): it was trained "
                              f"without train.ema_decay; export --weights evaluated (or fast)")
    if weights == "ema":
        state = load_tensor_file(path / EMA_MODEL_FILE)
    elif weights != "fast" and (path / SLOW_MODEL_FILE).is_file():
        state = load_tensor_file(path / SLOW_MODEL_FILE)
    elif (path / DDP_FILE).is_file():
        state = load_tensor_file(path / DDP_FILE)["model"]
    elif any(path.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 calls torch.load(weights_only=False) itself: weights_only_loading overrides that.
        with weights_only_loading(f"checkpoint {path}", trust_pickle=trust_pickle, allow="export --trust-pickle"):
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    elif (path / "mp_rank_00_model_states.pt").is_file():  # ZeRO-0: the module as trained
        with weights_only_loading(f"checkpoint {path}", trust_pickle=trust_pickle, allow="export --trust-pickle"):
            state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=not trust_pickle)["module"]
    else:
        raise CheckpointError(f"{str(path)!r} holds neither {DDP_FILE} (DDP) nor DeepSpeed model or ZeRO files")
    return {name: t.detach().float() if t.is_floating_point() else t.detach() for name, t in state.items()}


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export CKPT OUT``; it sets ``func(args) -> int``."""
    parser = subparsers.add_parser(
        "export", help="write a checkpoint's model weights as a plain state_dict",
        description="Write the model weights of a checkpoint directory (DDP or DeepSpeed ZeRO-0/1/2) as a "
                    "plain fp32 state_dict, which torch.load(OUT, weights_only=True) and model.load_state_dict "
                    "read without dist_train or DeepSpeed.")
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint directory, e.g. runs/x/checkpoints/"
                                                           "step-00001000 (DDP or DeepSpeed)")
    parser.add_argument("out", metavar="OUT", help="the .pt file to write")
    parser.add_argument("--weights", choices=WEIGHTS, default="evaluated",
                        help="evaluated (default): Lookahead's slow weights when the run used Lookahead, which is "
                             "what its test accuracy measured, else the trained weights; fast: the trained "
                             "weights; slow: the slow weights only; ema: the EMA of the weights, when the run kept "
                             "one (train.ema_decay), which its eval/ema_* metrics measured")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="let DeepSpeed's files unpickle in full, which can run code they name: only for a "
                             "checkpoint from a source you trust (by default every file loads weights-only)")
    parser.set_defaults(func=_run_export)
    return parser


def _run_export(args: argparse.Namespace) -> int:
    out = export_state_dict(args.checkpoint, args.out, weights=args.weights, trust_pickle=args.trust_pickle)
    print(f"wrote {out}")
    return 0
