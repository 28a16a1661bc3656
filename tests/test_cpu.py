"""What a CPU can and cannot do (dist_train/cpu.py, docs/cpu.md): the oneDNN route and the precision.

The oneDNN tests run convolutions that crash torch 2.14.1 on AVX2 CPUs, so each runs in a process of
its own (tests/onednn_probe.py): a crash fails that test and nothing else.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_train import cpu

REPO = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("onednn_probe.py")
CUDA = torch.device("cuda")  # only a label here: nothing is moved to it
CPU = torch.device("cpu")


def _probe(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # A hang is one way the bug shows (2 threads); the timeout turns it into a failure, not a stuck suite.
    try:
        return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"onednn_probe {' '.join(args)} hung for {timeout} s")


def _outcome(proc: subprocess.CompletedProcess) -> str:
    return f"exit status {proc.returncode}, stderr ends {proc.stderr[-300:]!r}"


# --- channels_last on CPU ------------------------------------------------------------------------
def _is_channels_last(t: torch.Tensor) -> bool:
    """By the strides, as oneDNN reads them (``is_contiguous()`` cannot tell the layouts of a 1x1 weight apart)."""
    channels_last = t.clone(memory_format=torch.channels_last).stride()
    assert channels_last != t.clone(memory_format=torch.contiguous_format).stride()  # the layouts differ
    return t.stride() == channels_last


def test_exactly_the_convolutions_onednn_mishandles_stay_in_the_default_layout_on_cpu():
    convs = {"1x1 s2, 4 in": nn.Conv2d(4, 8, 1, stride=2, bias=False),  # the reproducer's conv
             "1x1 s2, 2 in": nn.Conv2d(2, 16, 1, stride=2, bias=False),
             "1x1 s2, 7 in": nn.Conv2d(7, 3, 1, stride=(2, 1), bias=False),
             "1x1 s2, 8 in": nn.Conv2d(8, 16, 1, stride=2, bias=False),
             "1x1 s1, 4 in": nn.Conv2d(4, 8, 1, bias=False),
             "3x3 s2, 4 in": nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)}
    routed = {"1x1 s2, 4 in", "1x1 s2, 2 in", "1x1 s2, 7 in"}
    model = nn.ModuleDict(convs)
    assert cpu.apply_memory_format(model, channels_last=True, device=CPU) == torch.channels_last
    for name, conv in convs.items():
        assert _is_channels_last(conv.weight) == (name not in routed), name
        assert bool(conv._forward_pre_hooks) == (name in routed), name
        if name in routed:  # its input is made contiguous, so forward and backward both take the NCHW kernels
            x = torch.randn(2, conv.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
            assert conv._forward_pre_hooks[next(iter(conv._forward_pre_hooks))](conv, (x,))[0].is_contiguous()


def test_on_cuda_every_convolution_is_channels_last_and_nothing_is_hooked():
    model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 3, padding=1))
    assert cpu.apply_memory_format(model, channels_last=True, device=CUDA) == torch.channels_last
    assert all(_is_channels_last(m.weight) and not m._forward_pre_hooks for m in model)
    plain = nn.Conv2d(4, 8, 1, stride=2)
    assert cpu.apply_memory_format(plain, channels_last=False, device=CPU) == torch.contiguous_format
    assert plain.weight.is_contiguous() and not plain._forward_pre_hooks


def test_the_upstream_reproducer_runs_through_the_route():
    raw = _probe("raw", timeout=120)
    routed = _probe("routed", timeout=120)
    # On an AVX2-only CPU with torch 2.14.1 the raw reproducer dies (bus error, segfault, abort); where it
    # runs, the route must too. Either way the route must.
    assert routed.returncode == 0 and routed.stdout.strip() == "ok", (
        f"routed: {_outcome(routed)}; the raw reproducer here: {_outcome(raw)}")


def test_no_conv_or_cifar_resnet_on_the_grid_crashes_or_differs_with_channels_last():
    # 1x1 stride-2 convs with 1-16 channels in and out, cifar_resnet8 at widths 1-8 (1 and 3 input
    # channels), batches 1-64, fp32 and bf16 autocast: as dist_train sets a model up on CPU.
    proc = _probe("grid", "--threads", "1")
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), _outcome(proc)
    assert int(proc.stdout.split()[1]) > 4000  # every case ran


def test_the_grid_also_runs_with_two_threads():
    # dist_train gives one rank on this 2-core machine 2 threads; with 2 threads the raw bug can hang.
    proc = _probe("grid", "--threads", "2", "--quick")
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), _outcome(proc)


# --- precision ----------------------------------------------------------------------------------
@pytest.fixture
def native(monkeypatch):
    """Set what the CPU is said to support: ``native(True)`` or ``native(False)``."""
    def set_native(value: bool) -> None:
        monkeypatch.setattr(cpu, "native_bf16", lambda: value)
    return set_native


@pytest.mark.parametrize("has_native", [True, False])
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(native, has_native):
    native(has_native)
    assert cpu.resolve_precision("auto", CPU) == ("bf16" if has_native else "fp32", [])


@pytest.mark.parametrize("has_native", [True, False])
def test_explicit_bf16_warns_exactly_where_the_cpu_lacks_native_bf16(native, has_native):
    native(has_native)
    precision, warnings = cpu.resolve_precision("bf16", CPU)
    assert precision == "bf16"  # honoured: the user asked for it
    if has_native:
        assert warnings == []
    else:
        (warning,) = warnings
        assert "emulated" in warning and "train.precision=auto" in warning
        assert f"{cpu.EMULATED_BF16_SLOWDOWN['resnet50']:g}x for resnet50" in warning  # the measured cost


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, native, gpu_bf16):
    native(False)  # the host CPU plays no part
    monkeypatch.setattr(cpu, "_cuda_bf16", lambda device: gpu_bf16)
    assert cpu.resolve_precision("auto", CUDA) == ("bf16" if gpu_bf16 else "fp32", [])
    assert cpu.resolve_precision("fp32", CUDA) == ("fp32", [])
    assert cpu.resolve_precision("auto", CUDA, bf16_ok=False) == ("fp32", [])  # DeepSpeed ZeRO-0 refuses bf16


def test_a_resumed_auto_run_keeps_its_recorded_precision_with_a_warning(native):
    native(False)  # requeued onto a CPU without native bf16
    precision, warnings = cpu.resolve_precision("auto", CPU, recorded="bf16")
    assert precision == "bf16"
    assert "trained in bf16 and continues in it" in warnings[0] and "train.precision=fp32" in warnings[0]
    assert "emulated" in warnings[1]
    native(True)
    assert cpu.resolve_precision("auto", CPU, recorded="bf16") == ("bf16", [])


def test_an_explicit_precision_overrides_the_recorded_one_with_a_warning(native):
    native(True)
    precision, (warning,) = cpu.resolve_precision("fp32", CPU, recorded="bf16")
    assert precision == "fp32" and "continuing in train.precision=fp32" in warning
    with pytest.raises(ValueError, match="is not one of"):
        cpu.resolve_precision("fp8", CPU)


def test_native_bf16_on_this_machine_matches_the_kernel_cpu_flags(monkeypatch):
    # The real probe, against an independent source: the flags Linux lists.
    import platform

    if not sys.platform.startswith("linux"):
        pytest.skip("the kernel's CPU flags are read from Linux's /proc/cpuinfo")
    flags = cpu._cpu_flags()
    assert flags, "Linux lists the CPU's flags in /proc/cpuinfo"

    expected = bool(flags & {"avx512_bf16", "amx_bf16"}) if platform.machine() == "x86_64" else "bf16" in flags
    cpu.native_bf16.cache_clear()
    assert cpu.native_bf16() == expected
    # Without torch's private probes (a future torch may drop them) the flags decide, and nothing breaks.
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    cpu.native_bf16.cache_clear()
    try:
        assert cpu.native_bf16() == expected
    finally:
        cpu.native_bf16.cache_clear()


def _train(shards: Path, run_dir: Path, *overrides: str) -> None:
    from dist_train.train import run

    run(None, [f"data.shards={shards}", f"train.run_dir={run_dir}", "model.name=cifar_resnet8", "model.width=4",
               "model.channels_last=true", "data.num_workers=0", "train.global_batch_size=32",
               "train.micro_batch_size=16", "train.device=cpu", "train.progress_bar=false",
               "train.eval_every_epochs=0", "tracking.enabled=false", *overrides])


def _recorded(run_dir: Path) -> list[str]:
    return [json.loads((p / "MANIFEST.json").read_text())["run"]["precision"]
            for p in sorted((run_dir / "checkpoints").glob("step-*"))]


def test_checkpoints_record_the_precision_and_a_requeue_keeps_it(small_shards, tmp_path, caplog, native):
    # Started in bf16 (on a machine said to have it), requeued onto one without: auto keeps bf16, says so.
    native(True)
    _train(small_shards, tmp_path, "train.precision=bf16", "train.max_steps=2")
    assert _recorded(tmp_path) == ["bf16"]
    native(False)
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        _train(small_shards, tmp_path, "train.precision=auto", "train.max_steps=3")
    assert _recorded(tmp_path) == ["bf16", "bf16"]
    assert "trained in bf16 and continues in it" in caplog.text and "emulated" in caplog.text


def test_a_fresh_auto_run_on_this_cpu_records_what_the_cpu_supports(small_shards, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dist_train"):
        _train(small_shards, tmp_path, "train.precision=auto", "train.max_steps=1")
    assert _recorded(tmp_path) == ["bf16" if cpu.native_bf16() else "fp32"]
    assert "emulated" not in caplog.text


def test_cudnn_benchmark_follows_the_config_on_cuda_only(monkeypatch):
    from dist_train.config import load_config
    from dist_train.train import configure_cuda

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_cuda(load_config(None, []), torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False  # nothing on CPU
    configure_cuda(load_config(None, []), torch.device("cuda"))  # the flag only; no GPU needed to set it
    assert torch.backends.cudnn.benchmark is True  # on by default
    configure_cuda(load_config(None, ["train.cudnn_benchmark=false"]), torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is False
