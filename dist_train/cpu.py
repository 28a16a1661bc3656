"""What the device can do, and the settings a run resolves from it: precision and memory format.

Two settings of the GPU recipes go wrong on a CPU (docs/cpu.md, with the measurements in
docs/performance.md):

- ``train.precision=bf16`` on a CPU without native bf16 (no AVX512-BF16 or AMX on x86, no BF16 on Arm)
  runs autocast emulated, 8-15x slower than fp32 for the models measured. ``auto`` picks bf16 on CUDA and on
  CPUs with native bf16, fp32 elsewhere; an explicit ``bf16`` is honoured with a warning.
- ``model.channels_last=true`` is faster on CPU too, but torch 2.14.1's oneDNN corrupts memory in the
  backward of channels_last 1x1 strided convolutions with few input channels on AVX2 CPUs: those few
  convolutions run in the default layout (``apply_memory_format``).

The resolved precision is recorded in every checkpoint; a resumed run keeps it (``resolve_precision``'s
``recorded``), so a requeue onto another machine does not silently change the numerics.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Precision = Literal["fp32", "bf16", "fp16"]
"""A resolved precision: what ``auto`` becomes."""
# Measured by benchmarks/bench_cpu_precision.py on a 2-core AMD EPYC (AVX2, no native bf16), one thread:
# bf16 autocast against fp32, CPU time per training step (docs/performance.md).
EMULATED_BF16_SLOWDOWN = {"resnet50": 12.3, "resnet18": 15.2, "the demo model": 8.4}


def cpu_capability() -> str:
    """The vector ISA torch dispatches to on this CPU: ``AVX2``, ``AVX512``, ``DEFAULT``, ``SVE256``..."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older or unusual builds: only a label for messages
        return "unknown"


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags Linux lists for the first CPU (x86 ``flags``, Arm ``Features``); empty elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware, so that bf16 autocast is not emulated.

    x86: AVX512-BF16 or AMX, asked of torch's private probes where they exist (they do since torch 2.1;
    any failure counts as no), or else read from the kernel's CPU flags. Arm: the ``bf16`` feature flag,
    which torch's probes do not see. Everything else: no."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        probes: list[Any] = [getattr(torch.cpu, name, None)
                             for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if all(callable(p) for p in probes):
            try:
                return any(bool(p()) for p in probes)
            except Exception:
                pass
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if machine in ("aarch64", "arm64"):
        return "bf16" in _cpu_flags()
    return False


def _cuda_bf16(device: torch.device) -> bool:
    try:  # including_emulation=False: a V100 "supports" bf16 only by emulating it
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch builds without the argument
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(requested: str, device: torch.device, *, recorded: str | None = None,
                      bf16_ok: bool = True) -> tuple[Precision, list[str]]:
    """The precision this run trains in (``fp32``, ``bf16`` or ``fp16``, never ``auto``), and the warnings
    the main rank should print about it.

    ``recorded`` is the precision a checkpoint being resumed was trained in. Under ``auto`` it wins, so
    the numerics of a run do not change with the machine it is requeued onto; an explicit setting that
    differs from it is honoured with a warning. A CPU without native bf16 that ends up in bf16 gets a
    warning with the measured cost. ``bf16_ok=False``: the backend refuses bf16 (DeepSpeed ZeRO-0), so
    ``auto`` picks fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision={requested!r} is not one of {PRECISIONS}")
    warnings = []
    if requested == "auto":
        here = "bf16" if bf16_ok and (_cuda_bf16(device) if device.type == "cuda" else native_bf16()) else "fp32"
        resolved = recorded or here
        if recorded and recorded != here:
            warnings.append(f"train.precision=auto: this run was trained in {recorded} and continues in it, though "
                            f"{_describe(device)} would pick {here}; set train.precision={here} to change it")
    else:
        resolved = requested
        if recorded and recorded != requested:
            warnings.append(f"the checkpoint was trained in {recorded}; continuing in train.precision={requested} "
                            f"as the config asks")
    if resolved == "bf16" and device.type == "cpu" and not native_bf16():
        costs = ", ".join(f"{x:g}x for {model}" for model, x in EMULATED_BF16_SLOWDOWN.items())
        warnings.append(f"train.precision=bf16 on a CPU without native bf16 (capability {cpu_capability()}): "
                        f"autocast is "
                        f"emulated, measured {costs} slower than fp32 (docs/performance.md); set "
                        f"train.precision=auto (fp32 here, bf16 on GPUs) or fp32")
    return cast(Precision, resolved), warnings


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU capability {cpu_capability()}, native bf16 {'yes' if native_bf16() else 'no'}"


# The convolutions torch 2.14.1's oneDNN mishandles on AVX2 CPUs in channels_last: 1x1 with a stride, fewer
# than 8 input channels. Measured crashing (forward + backward, any of 1-16 output channels, batches 2-64, 14
# and 28 px) for 2-7 input channels; 1 and 8-16 ran, as did 3x3 stride-2 and 1x1 stride-1 (docs/cpu.md).
ONEDNN_BUG_MAX_IN_CHANNELS = 7


def _hits_onednn_bug(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and max(conv.stride) > 1 and conv.in_channels <= ONEDNN_BUG_MAX_IN_CHANNELS


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def apply_memory_format(model: nn.Module, *, channels_last: bool, device: torch.device) -> torch.memory_format:
    """Put ``model`` in channels_last if asked; returns the memory format its inputs should have.

    channels_last is faster on GPUs and, measured, on CPUs too (docs/performance.md), so it is kept on
    CPU, but the convolutions that torch's oneDNN corrupts memory with (``_hits_onednn_bug``) run in the
    default layout there: their weight is stored contiguous and a forward pre-hook makes their input
    contiguous. oneDNN picks the kernel of the backward pass from those same two tensors, so the backward
    is routed too (turning oneDNN off around the forward alone is not enough: the backward still crashes).
    A 1x1 weight must be cloned, not ``.contiguous()``-ed: with 1x1 kernels both layouts count as
    contiguous, and oneDNN reads the strides."""
    if not channels_last:
        return torch.contiguous_format
    model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        routed = [m for m in model.modules() if isinstance(m, nn.Conv2d) and _hits_onednn_bug(m)]
        for conv in routed:
            conv.weight.data = conv.weight.data.clone(memory_format=torch.contiguous_format)
            conv.register_forward_pre_hook(_contiguous_input)
        if routed:
            log.info("channels_last on CPU: %d 1x1 strided convolution(s) with < %d input channels run in the "
                     "default layout, around a oneDNN bug (docs/cpu.md)", len(routed),
                     ONEDNN_BUG_MAX_IN_CHANNELS + 1)
    return torch.channels_last
