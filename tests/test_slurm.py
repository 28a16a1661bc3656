"""The SLURM launcher on a real two-node cluster (slurmctld, slurmdbd, munge, mariadb; one slurmd on each of
two hosts, network namespaces with addresses of their own: tests/infra/slurm_cluster.py).

The training jobs run one rank on each node, so their gloo process group, their checkpoints and their
preemption go across the two hosts' link; the probe jobs run on one node.

Jobs go through the launcher's own code path: ``plan_jobs`` -> ``make_executor`` -> ``submit``
-> ``follow``. ``ENTRY`` is what every task runs instead of the trainer: a probe that forms
the gloo process group from the env ``TorchDistributedEnvironment().export()`` set. To run real
training, set ``ENTRY = None`` (``dist_train.train.run``) and assert on the returned summaries.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import cloudpickle
import pytest
from infra import probes
from infra.slurm_cluster import SlurmCluster

from dist_train.launch import slurm
from dist_train.launch.local import torchrun_command
from dist_train.launch.sweep import sweep_members

# The probes module is not importable in the job; ship its functions inside the pickles.
cloudpickle.register_pickle_by_value(probes)

ENTRY = probes.gloo_ranks
JOB_TIMEOUT_S = 90


def _override(overrides: list[str], key: str) -> str:
    return [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")][-1]


def _launch(cluster: SlurmCluster, tmp_path: Path, overrides: list[str], *, entry=ENTRY, members=(),
            **resources) -> tuple[list, list[slurm.TrainJob]]:
    res = slurm.SlurmResources(time_min=5, partition=cluster.partition, **resources)
    jobs = slurm.plan_jobs(None, overrides, members=members, world_size=res.world_size, entry=entry)
    executor = slurm.make_executor("slurm", tmp_path / "slurm" / "%j", res)
    return slurm.submit(executor, jobs), jobs


def _results(handle, cluster: SlurmCluster, *, timeout_s: float = JOB_TIMEOUT_S) -> list:
    """The job's per-task results, or a failure that shows the job's and the daemons' logs."""
    deadline = time.monotonic() + timeout_s
    while not handle.done():
        if time.monotonic() > deadline:
            pytest.fail(f"job {handle.job_id} not done after {timeout_s} s; state {handle.state}\n"
                        f"stderr: {handle.stderr()}\n{cluster.logs()}")
        time.sleep(0.5)
    return handle.results()


def _final_state(cluster: SlurmCluster, job_id: str, *, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = cluster.cli("sacct", "--noheader", "--parsable2", "--format=State", "-X", "-j", job_id).strip()
        if state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "") or time.monotonic() > deadline:
            return state
        time.sleep(0.3)


@pytest.mark.slurm
def test_two_task_cpu_job_forms_a_process_group(slurm_cluster, tmp_path):
    handles, _ = _launch(slurm_cluster, tmp_path, [f"train.run_dir={tmp_path / 'run'}"], tasks_per_node=2)
    results = _results(handles[0], slurm_cluster)
    assert sorted(int(r["RANK"]) for r in results) == [0, 1]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["MASTER_PORT"]) for r in results} == {
        ("2", "2", results[0]["MASTER_PORT"])}
    assert [r["rank_sum"] for r in results] == [1, 1]  # the all-reduce went through gloo
    out = io.StringIO()
    assert slurm.follow(handles, poll_s=0.2, out=out) == 0, out.getvalue()
    # The result file lands just before the job step ends; accounting follows within a moment.
    assert _final_state(slurm_cluster, handles[0].job_id) == "COMPLETED"


@pytest.mark.slurm
def test_preempted_job_is_requeued_and_resumes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    handles, _ = _launch(slurm_cluster, tmp_path, [f"train.run_dir={run_dir}", "checkpoint.resume=false"],
                         entry=probes.hold_until_requeued, tasks_per_node=2)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (run_dir / "checkpoint").exists():
        assert time.monotonic() < deadline, f"first attempt never started:\n{slurm_cluster.logs()}"
        time.sleep(0.2)
    # What SLURM sends signal_delay_s before a time limit, and what a preempting scheduler sends.
    slurm_cluster.cli("scancel", "--signal=USR2", handles[0].job_id)
    results = _results(handles[0], slurm_cluster)
    assert [r["resumed"] for r in results] == [True, True]
    assert {r["restart_count"] for r in results} == {1}
    # Requeued with the same overrides, forced to resume despite checkpoint.resume=false.
    assert results[0]["overrides"][-1] == slurm.RESUME_OVERRIDE
    assert results[0]["overrides"][:2] == [f"train.run_dir={run_dir}", "checkpoint.resume=false"]
    # Only rank 0 itself checkpointed and requeued, not the forked helper that inherited its handler.
    logs = handles[0].paths.stdout.read_text() + handles[0].paths.stderr.read_text()
    assert logs.count("Calling checkpoint method") == 1, logs


@pytest.mark.slurm
def test_sweep_runs_as_one_job_array(slurm_cluster, tmp_path):
    members = sweep_members(grid=["optim.lr=0.1,0.2,0.4"])
    handles, _ = _launch(slurm_cluster, tmp_path, [f"train.run_dir={tmp_path / 'sweep'}"], members=members)
    assert len({h.job_id.split("_")[0] for h in handles}) == 1, [h.job_id for h in handles]
    results = [_results(h, slurm_cluster)[0] for h in handles]
    assert sorted(r["slurm_array_task_id"] for r in results) == ["0", "1", "2"]
    assert [_override(r["overrides"], "optim.lr") for r in results] == ["0.1", "0.2", "0.4"]
    run_dirs = {_override(r["overrides"], "train.run_dir") for r in results}
    assert len(run_dirs) == 3 and all(Path(d).parent == tmp_path / "sweep" for d in run_dirs)
    assert slurm.follow(handles, poll_s=0.2, out=io.StringIO()) == 0


@pytest.mark.slurm
def test_follow_reports_a_failed_job(slurm_cluster, tmp_path):
    handles, _ = _launch(slurm_cluster, tmp_path, [], entry=probes.diverge)
    out = io.StringIO()
    assert slurm.follow(handles, poll_s=0.2, out=out) == 1
    assert "FAILED" in out.getvalue() and "loss diverged at step 3" in out.getvalue()


# --- no cluster needed ---------------------------------------------------------------------------


def test_local_executor_runs_two_ranks_without_slurm(tmp_path):
    res = slurm.SlurmResources(tasks_per_node=2, time_min=5)
    jobs = slurm.plan_jobs(None, [], world_size=res.world_size, entry=ENTRY)
    handles = slurm.submit(slurm.make_executor("local", tmp_path / "%j", res), jobs)
    results = handles[0].results()
    assert sorted(int(r["RANK"]) for r in results) == [0, 1] and results[0]["rank_sum"] == 1


def test_the_submitit_folder_is_private_and_a_writable_one_is_refused(tmp_path):
    # Every task unpickles the job file in this folder: whoever can write there runs code as the job's user.
    made = slurm.private_folder(tmp_path / "mine" / "%j")
    assert made == tmp_path / "mine" and made.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    with pytest.raises(PermissionError, match="chmod go-w"):
        slurm.make_executor("local", shared / "%j", slurm.SlurmResources())


def test_plan_checks_every_member_before_submitting():
    with pytest.raises(ValueError, match="optim.lrr"):
        slurm.plan_jobs(None, [], members=sweep_members(grid=["optim.lrr=0.1,0.2"]), world_size=1)
    with pytest.raises(ValueError, match="not divisible"):
        slurm.plan_jobs(None, ["train.global_batch_size=256", "train.micro_batch_size=128"], world_size=3)
    with pytest.raises(ValueError, match="one task per GPU"):
        slurm.SlurmResources(gpus_per_node=8, tasks_per_node=2)


def test_sweep_grid_is_a_product_and_members_get_their_own_outputs():
    members = sweep_members(grid=["optim.lr=0.1,0.2", "train.seed=0,1"])
    assert [m.overrides for m in members] == [("optim.lr=0.1", "train.seed=0"), ("optim.lr=0.1", "train.seed=1"),
                                              ("optim.lr=0.2", "train.seed=0"), ("optim.lr=0.2", "train.seed=1")]
    sets = sweep_members(override_sets=["optim.lr=0.1 train.global_batch_size=512", "optim.lr=0.2"])
    assert [m.overrides for m in sets] == [("optim.lr=0.1", "train.global_batch_size=512"), ("optim.lr=0.2",)]
    jobs = slurm.plan_jobs(None, ["train.run_dir=runs/lr"], members=sets, world_size=1)
    assert {_override(list(j.overrides), "train.run_dir") for j in jobs} == {
        f"runs/lr/{m.tag}" for m in sets}
    with pytest.raises(ValueError, match="not both"):
        sweep_members(grid=["optim.lr=0.1"], override_sets=["optim.lr=0.2"])


def test_torchrun_command_single_and_multi_node():
    single = torchrun_command("configs/demo.yaml", ["optim.lr=0.1"], nproc_per_node=2)
    assert single[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m",
                          "dist_train.cli", "train", "configs/demo.yaml", "optim.lr=0.1"]
    multi = torchrun_command(None, [], nproc_per_node=8, nnodes=4, rdzv_endpoint="node0:29400")
    assert "--rdzv-backend=c10d" in multi and "--rdzv-endpoint=node0:29400" in multi and "--nnodes=4" in multi
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        torchrun_command(None, [], nproc_per_node=8, nnodes=4)


# --- the real trainer on the cluster -----------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def _train_overrides(shards, tmp_path, *, max_steps, every):
    return [f"data.shards={shards}", f"train.max_steps={max_steps}", "train.epochs=100", "train.log_every_steps=1",
            "train.progress_bar=false", f"checkpoint.every_steps={every}", f"train.run_dir={tmp_path / 'run'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=slurm"]


def _submit_training(cluster, shards, tmp_path, *, max_steps, every):
    """The demo config as a CPU job of 2 nodes x 1 task through the launcher's own plan -> executor -> submit
    path (``dist-train launch slurm --nodes 2``)."""
    res = slurm.SlurmResources(time_min=5, partition=cluster.partition, nodes=2, tasks_per_node=1)
    jobs = slurm.plan_jobs(str(REPO / "configs/demo.yaml"),
                           _train_overrides(shards, tmp_path, max_steps=max_steps, every=every), world_size=2)
    return slurm.submit(slurm.make_executor("slurm", tmp_path / "slurm" / "%j", res), jobs)


def _logged_steps(tmp_path, key="train/loss"):
    from mlflow.tracking import MlflowClient

    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)], client.get_run(run_id)


@pytest.mark.slurm
def test_two_task_training_job_completes_and_is_tracked(slurm_cluster, small_shards, tmp_path):
    handles = _submit_training(slurm_cluster, small_shards, tmp_path, max_steps=6, every=3)
    summaries = _results(handles[0], slurm_cluster, timeout_s=300)
    assert [s["step"] for s in summaries] == [6, 6] and [s["is_main"] for s in summaries] == [True, False]
    assert _nodes_of(slurm_cluster, handles[0].job_id) == set(slurm_cluster.nodes)  # one rank on each host
    steps, run = _logged_steps(tmp_path)
    assert steps == [1, 2, 3, 4, 5, 6] and run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and "eval/acc1" in run.data.metrics


def _nodes_of(cluster, job_id: str) -> set[str]:
    """The nodes the job's tasks ran on, as SLURM recorded them."""
    listed = cluster.cli("sacct", "--noheader", "--parsable2", "--format=NodeList", "-X", "-j", job_id).split()
    return set(cluster.cli("scontrol", "show", "hostnames", listed[-1]).split())


def _wait_for_logged_step(tmp_path, handle, step, *, timeout_s=240):
    """The last training step in MLflow, once it is at least ``step``."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline and not handle.done(), f"no step {step} logged:\n{handle.stderr()}"
        try:
            steps, _ = _logged_steps(tmp_path)
        except Exception:  # the run id file or the store not there yet
            steps = []
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.2)


def _resumed_at(handle) -> int:
    logs = handle.paths.stderr.read_text()
    found = re.findall(r"resumed from \S+ at step (\d+)", logs)
    assert len(found) == 1, logs[-3000:]
    return int(found[0])


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["usr2", "scontrol-requeue"])
def test_a_preempted_training_job_without_periodic_checkpoints_resumes_within_one_step(slurm_cluster, small_shards,
                                                                                    tmp_path, how):
    # USR2: what SLURM sends before the time limit (--signal) and on preemption with send_user_signal;
    # submitit's handler requeues, after our checkpoint. `scontrol requeue` (and SLURM's own preemption
    # requeue) sends SIGTERM: we checkpoint and stop, and SLURM requeues by itself.
    handles = _submit_training(slurm_cluster, small_shards, tmp_path, max_steps=40, every=0)
    signalled_after = _wait_for_logged_step(tmp_path, handles[0], 10)
    if how == "usr2":
        slurm_cluster.cli("scancel", "--signal=USR2", handles[0].job_id)
    else:
        slurm_cluster.cli("scontrol", "requeue", handles[0].job_id)
    summaries = _results(handles[0], slurm_cluster, timeout_s=400)
    assert [s["step"] for s in summaries] == [40, 40]
    assert _nodes_of(slurm_cluster, handles[0].job_id) == set(slurm_cluster.nodes)
    # The checkpoint was written after the step in flight when the signal came: nothing before it is redone.
    resumed_at = _resumed_at(handles[0])
    print(f"{how}: signalled after step {signalled_after} was logged; resumed at step {resumed_at}")
    assert signalled_after <= resumed_at <= signalled_after + 2
    steps, run = _logged_steps(tmp_path)
    assert steps == list(range(1, 41)) and run.info.status == "FINISHED"  # every step once, one run
    if how == "usr2":  # submitit requeued once, from rank 0, after every rank had saved
        logs = handles[0].paths.stdout.read_text() + handles[0].paths.stderr.read_text()
        assert logs.count("Calling checkpoint method") == 1, logs[-3000:]
