"""far_ho2.distribute and hyper_repr under tf.distribute, on the CPU: MirroredStrategy over 2 and 4
logical CPU devices, and MultiWorkerMirroredStrategy over two worker processes on 127.0.0.1,
each against the same computation on one device (float64). They run in fresh processes
(``tests/distributed.py``, the launchers): logical devices must be configured before TensorFlow
initialises its devices, which this process has done, and TF_CONFIG is read at start-up. Each
MirroredStrategy process runs the cases of its device count once (a module fixture); the tests
assert on what they measured."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from far_ho2.launch import workdir
from hyper_repr import train
from oracles import relative_error
from test_few_shot_launchers import error_line, finish, last_checkpoint, launch, mini  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXACT = 1e-10  # float64 under a strategy vs one device: the same sums in another order
METRIC = 1e-6  # Keras's loss metrics are float32
CASES = {2: ["clipped", "langevin", "generic", "errors", "stochastic"], 4: ["hypergradient"]}
LONG_CASES = {2: ["hypergradient", "adam", "backup", "meta_train", "multiclass", "evaluate"],
              4: ["clipped", "adam", "evaluate", "generic", "stochastic"]}


def run_cases(devices: int, cases: list) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed.py"), "mirrored", str(devices),
                           ",".join(cases)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module", params=[2, 4], ids=["2_devices", "4_devices"])
def mirrored(request) -> dict:
    """The cases of ``CASES`` (and ``LONG_CASES`` with --long) under a MirroredStrategy of 2 or 4
    logical CPU devices, each with its single-device reference, in one process."""
    devices = request.param
    return {"devices": devices, **run_cases(devices, CASES[devices] + (
        LONG_CASES[devices] if request.config.getoption("--long") else []))}


def case(mirrored: dict, name: str) -> dict:
    if name not in mirrored:
        pytest.skip(f"{name} runs with {'--long' if name in LONG_CASES[mirrored['devices']] else 'other devices'}")
    return mirrored[name]


def test_a_mirrored_hyper_iteration_is_the_single_device_one(mirrored):
    """fit's step (SGD with step 1: the update is −∇E, η included): the hypergradient of the whole
    meta-batch on one device; the heads are each replica's own (SyncOnRead) variables."""
    result = case(mirrored, "hypergradient")
    assert result["finite"] and result["heads"] == "SyncOnReadVariable"
    assert result["grads"] <= EXACT and result["loss"] <= METRIC


def test_clipping_applies_to_the_all_reduced_hypergradient(mirrored):
    """With ``clip`` the step is −clip(∇E) of one device (clipping each replica's share and
    summing would differ); the threshold clips some entries."""
    result = case(mirrored, "clipped")
    assert result["grads"] <= EXACT and result["clipped"] > 0


@pytest.mark.long
def test_adam_steps_are_the_single_device_ones(mirrored):
    assert case(mirrored, "adam")["update"] <= EXACT


def test_the_generic_path_gives_the_hyper_optimizer_and_closed_form_hypergradients(mirrored):
    """far.distribute's recipe on a batched ridge problem: ∇E equals far.HyperOptimizer's on one
    device and far.oracles' closed form; the hyperparameters after 2 Adam updates are the
    HyperOptimizer's (and moved)."""
    result = case(mirrored, "generic")
    assert result["w"] == "SyncOnReadVariable" and result["moved"] > 1e-3
    assert max(result["closed_form"], result["hyper_optimizer"], result["hypers"]) <= EXACT


def test_langevin_heads_draw_the_noise_of_one_device(mirrored):
    """Each replica draws its rows of the meta-batch's noise: the step is the one-device step on
    the whole meta-batch; not the mean of the shares' each drawing noise for its own size."""
    result = case(mirrored, "langevin")
    assert result["grads"] <= EXACT and result["naive"] > 1e-2


def test_stochastic_hg_gives_every_replica_the_single_device_estimate_and_diagnostics(mirrored):
    """far.StochasticHG on a meta-batch of Gaussian problems split across the replicas ('pathwise',
    'reversed' and 'score' on one scalar problem with hoisted features, 'reversed' and pooled
    'score' on declared chains): every replica's E, ∇E, standard errors and chain statistics, and
    the hypergradient the replicas' shares sum to, are those of one device holding the whole
    meta-batch (float64)."""
    result = case(mirrored, "stochastic")
    assert result["runs"] == 4 and result["finite"]
    for name in ("value", "grads", "standard_errors", "statistics", "share_value", "share_grads"):
        assert result[name] <= 1e-12, (name, result[name])


def test_a_distributed_batch_gives_replica_r_the_rows_r_n_to_r_plus_1_n(mirrored):
    """experimental_distribute_dataset splits a batch of R·n rows into consecutive shares: replica
    r gets the rows [r·n, (r+1)·n), the slice of the meta-batch's noise far_ho2.sharding.normal
    draws for it."""
    assert case(mirrored, "stochastic")["rows"]


def test_multiclass_batches_are_normalised_per_replica(mirrored):
    result = case(mirrored, "multiclass")
    assert result["grads"] <= EXACT


def test_evaluation_sums_its_metrics_over_uneven_shares(mirrored):
    """6 episodes in batches of 4: the last batch leaves replicas with one episode or none."""
    result = case(mirrored, "evaluate")
    assert result["accuracy"] <= EXACT and result["ci"] <= EXACT and result["loss"] <= METRIC


def test_a_meta_batch_the_replicas_do_not_divide_is_a_clear_error(mirrored):
    messages, replicas = case(mirrored, "errors"), mirrored["devices"]
    tail = f"does not split across the {replicas} replicas of the strategy: .* use a multiple of {replicas}."
    assert re.fullmatch(f"`x`: the meta-batch size={replicas + 1} " + tail, messages["fit"])
    assert re.fullmatch(f"--meta_batch_size={replicas + 1} " + tail, messages["check"])
    assert re.search(f"far.distribute: the {replicas} replicas hold meta-batch shares of different sizes",
                     messages["uneven"])


@pytest.mark.long
def test_backup_and_restore_resumes_under_a_strategy(mirrored):
    result = case(mirrored, "backup")
    assert result["resumed"] == 0 and result["one_device"] <= EXACT


@pytest.mark.long
def test_meta_train_resumes_under_a_strategy_to_the_single_device_run(mirrored):
    result = case(mirrored, "meta_train")
    assert result["checkpoint"] <= EXACT and result["variables"] > 20 and result["rows"] == [2, 4]
    assert set(workdir.OUTPUTS + train.OUTPUTS) <= set(result["files"])
    assert_same_scores(*result["test"])


def assert_same_scores(first: dict, second: dict) -> None:
    """Two results.json "test" entries: the same settings, models, accuracies and CIs."""
    assert sorted(first) == sorted(second)
    for setting, scores in first.items():
        assert sorted(scores) == sorted(second[setting])
        for name, score in scores.items():
            for key in ("accuracy", "ci"):
                assert score[key] == pytest.approx(second[setting][name][key], rel=EXACT, abs=1e-12)


# -- MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 -----------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tf_configs(workers: int) -> list[str]:
    """Each worker's TF_CONFIG: the cluster on free local ports, and its task."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(workers)]


def start(command: list, **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})


def test_two_workers_train_as_one_process_with_the_whole_meta_batch(tmp_path):
    """3 hyper-iterations of fit (Adam, a learned η) on meta-batches of 4, 2 per worker: the
    weights of one process with the whole meta-batches."""
    script = [sys.executable, str(ROOT / "tests" / "distributed.py"), "worker"]
    processes = [start(script + [str(tmp_path / f"worker{i}.npz")], TF_CONFIG=config)
                 for i, config in enumerate(tf_configs(2))]
    processes.append(start(script + [str(tmp_path / "single.npz")]))
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
    roles = [json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs]
    assert [(r["chief"], r["workers"], r["replicas"]) for r in roles] == [(True, 2, 2), (False, 2, 2), (True, 1, 1)]
    assert roles[0]["loss"] == roles[1]["loss"] == pytest.approx(roles[2]["loss"], rel=METRIC)
    weights = [np.load(tmp_path / name) for name in ("worker0.npz", "worker1.npz", "single.npz")]
    assert len(weights[2].files) == 9
    for name in weights[2].files:
        assert relative_error(weights[0][name], weights[2][name]) <= EXACT
        np.testing.assert_array_equal(weights[1][name], weights[0][name])  # mirrored


def checkpoint_error(first: pathlib.Path, second: pathlib.Path) -> float:
    """The worst relative error between the weights and optimizer states of two runs' last
    checkpoints (per variable, over its entries)."""
    a, b = last_checkpoint(first), last_checkpoint(second)
    assert sorted(a) == sorted(b) and len(a) > 20 and any(n.startswith("optimizer/") for n in a)
    return max(relative_error(a[name], b[name]) for name in a if np.any(b[name]))


def test_launcher_strategy_flags_fail_in_one_line(tmp_path, mini):  # noqa: F811
    logdir = f"--logdir={tmp_path / 'run'}"
    processes = {
        "cpu_devices": launch("miniimagenet", logdir, *mini, "--cpu_devices=2"),
        "tf_config": launch("miniimagenet", logdir, *mini, "--strategy=multi_worker"),
        "meta_batch": launch("miniimagenet", logdir, *mini, "--strategy=mirrored", "--cpu_devices=4"),
    }
    expected = {"cpu_devices": r"--cpu_devices=2 splits a CPU without GPU for --strategy=mirrored; here --strategy=none",
                "tf_config": "--strategy=multi_worker needs the TF_CONFIG environment variable",
                "meta_batch": "--meta_batch_size=2 does not split across the 4 replicas of the strategy"}
    for name, process in processes.items():
        code, _, stderr = finish(process)
        assert code == 1 and re.search(expected[name], error_line(stderr)), (name, stderr[-2000:])
    assert not (tmp_path / "run").exists()


@pytest.mark.long
def test_the_documented_two_worker_launch_resumes_and_matches_one_process(tmp_path, mini):  # noqa: F811
    """``python -m flags.miniimagenet --strategy=multi_worker`` on two local workers (docs/distribute.md's
    commands): 2 hyper-iterations, relaunched to 3 (the other worker resumes from the chief's
    checkpoint), against 3 in one process. Only the chief prints and writes the run; the other
    worker's temporary folders are gone."""
    common = (*mini, "--dtype=float64", "--T=2", "--eval_every=2")
    multi, single = f"--logdir={tmp_path / 'multi'}", f"--logdir={tmp_path / 'single'}"
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    alone = launch("miniimagenet", single, *common, "--hyper_iterations=3")
    for iterations in (2, 3):
        configs = tf_configs(2)
        workers = [start([sys.executable, "-m", "flags.miniimagenet", multi, *common, "--strategy=multi_worker",
                          f"--hyper_iterations={iterations}"], TF_CONFIG=configs[i],
                         **({"TMPDIR": str(temporary)} if i else {})) for i in range(2)]
        outputs = [finish(p) for p in workers]
        for code, _, stderr in outputs:
            assert code == 0, stderr[-3000:]
        assert f"{iterations} hyper-iterations" in outputs[0][1] and outputs[1][1] == ""
    code, stdout, stderr = finish(alone)
    assert code == 0, stderr[-3000:]
    assert checkpoint_error(tmp_path / "multi", tmp_path / "single") <= EXACT
    results = [json.loads((tmp_path / name / train.RESULTS).read_text()) for name in ("multi", "single")]
    assert results[0]["iterations"] == 3 and results[0]["flags"]["strategy"] == "multi_worker"
    assert_same_scores(results[0]["test"], results[1]["test"])
    assert [r["iteration"] for r in train.read_metrics(tmp_path / "multi")] == [2, 3]
    assert set(workdir.OUTPUTS + train.OUTPUTS) <= {p.name for p in (tmp_path / "multi").iterdir()}
    assert not any(temporary.iterdir())
