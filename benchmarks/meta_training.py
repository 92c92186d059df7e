"""Meta-training speed of hyper-representation: episodes per second and memory, Omniglot 5-way 1-shot.

The subject is one hyper-iteration of ``hyper_repr.meta_learner.MetaLearner.meta_step`` (Algorithm 1
of Franceschi et al., ICML 2018): B episodes, each a logistic head fitted by T steps of gradient
descent on the support features of the Omniglot network (4 strided conv-64 layers, 256 features,
float32), the hypergradient of the mean query cross-entropy by reverse mode through the T head
steps, then an outer Adam step on the network's weights and the learned head learning rate η:

    w_{j,t+1} = w_{j,t} − η ∇_w CE(h_λ(X^tr_j) W_{j,t} + b_{j,t}, Y^tr_j),   w_{j,0} = 0,  t < T
    E(λ, η) = (1/B) Σ_j CE(h_λ(X^val_j) W_{j,T} + b_{j,T}, Y^val_j),   (λ, η) ← Adam(∇E)

Episodes are those of training: 5-way 1-shot with 15 queries per class, drawn by the real
``hyper_repr.data.episode_dataset`` from the bundled Omniglot (``data/omniglot`` of the repository;
test alphabets Sanskrit and Tagalog, validation alphabet Early_Aramaic, as
the bundled-data run of ``flags/omniglot.py``, whose default learner settings are used too: η = 0.1,
learned). Measured for every meta-batch size B ∈ {4, 16} and T ∈ {1, 5, 10}, each in a fresh
process:

* step-only: episodes/s of ``meta_step`` on meta-batches pre-drawn from the pipeline (cycled);
* with pipeline: episodes/s of ``meta_step(next(iterator))`` on the live ``episode_dataset``,
  i.e. what the training loop gets; the two alternate chunk by chunk, so load drifts hit both alike.
  Rates are the median over chunks (``Timing``: 5 chunks of ≥ 1.5 s per mode) after the first
  (tracing) call and 2 s of warm-up calls; ms per meta-step is the median of the step-only calls.
  The process's CPU time per step (all threads, ``time.process_time``) is reported beside them: it
  varies less than wall time with the load of other processes on the shared machine;
* the pipeline alone: ms per meta-batch of ``next(iterator)`` without compute, and the latency of
  the first batch of a stream resumed at ``first_episode`` = 400,000 (it is a counter, not a skip);
* the first call's time (tracing + one step) and peak memory: peak RSS above the process's
  baseline after imports, data loading, the pre-drawn batches and the (untraced) learner; on a
  GPU also TF's peak device memory.

CPU processes hide any GPU; when one is visible to TensorFlow, every configuration runs again on
it (device column "gpu"). The reference: the same model and episodes in PyTorch, differentiating
through the unrolled heads as ``higher`` does, meta-train at 36 episodes/s (T = 5, B = 4) on this
2-core machine, idle; the ratio is printed next to it (comparable only on an idle machine: the
1-minute load average is reported).

Then the real training loop, ``hyper_repr.train.meta_train`` (B = 4, T = 5, 500 iterations,
validation every 250 iterations on 200 episodes, a checkpoint at each validation and at the end,
then the meta-test on 3 × 200 test episodes), in a temporary workdir of a fresh process,
instrumented from outside: its ``_restore``, ``_train_batches`` and ``_test`` are wrapped, so the
learner's ``meta_step`` and ``evaluate``, the checkpoint manager's ``save`` and every training
batch are timed (wall and CPU); hyper_repr is not modified. Reported: the loop's episodes/s
(overall, by meta_train's own elapsed time and its logged rates), each component's time, the
residual Python per iteration, the loop's time beyond N × (median step + median batch) by cause, the same learner's step
outside the loop in the same process, and the projected rate of a 780-s run (the README example's
budget) from the measured components.

Run from the repository root (about 7 minutes on 2 cores at load 3-5, less when idle; ``--quick``:
B = 4, T ∈ {1, 5}, short timing and a 20-iteration loop, a smoke run of under a minute on an idle
machine, 80 s at load 3):

    python benchmarks/meta_training.py
    python benchmarks/meta_training.py --meta-batch-sizes 4 --steps 5 --loop-iterations 2000
    python benchmarks/meta_training.py --quick

Progress goes to stderr, the tables to stdout; the results are written to
``benchmarks/results/meta_training[_quick].{csv,json}``. The worker modes (``--worker DEVICE``
with one B and T, ``--loop-worker``) are internal: they print one JSON line.

References:
    Franceschi, Frasconi, Salzo, Grazzi, Pontil. Bilevel Programming for Hyperparameter
    Optimization and Meta-Learning. ICML 2018, arXiv:1806.04910.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hypergradient_cost import fmt, machine_info, max_rss_mb, table, timed

REPOSITORY = Path(__file__).resolve().parent.parent
DATA_DIR = REPOSITORY / "data" / "omniglot"
TEST_ALPHABETS, VAL_ALPHABETS = ("Sanskrit", "Tagalog"), ("Early_Aramaic",)
WAYS, SHOTS, QUERIES, SEED = 5, 1, 15, 0
LEARNING_RATE, LEARN_LR = 0.1, True  # flags/omniglot.py's defaults
DEFAULT_BATCH_SIZES, DEFAULT_STEPS = (4, 16), (1, 5, 10)
QUICK_BATCH_SIZES, QUICK_STEPS = (4,), (1, 5)
REFERENCE = {"name": "PyTorch + higher", "meta_batch_size": 4, "steps": 5, "episodes_per_second": 36.0}
PRE_DRAWN = 16  # meta-batches drawn before timing, cycled by the step-only calls
RESUME_EPISODE = 400_000  # first_episode of the resumed stream (iteration 100,000 at B = 4)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WORKER_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long each configuration is timed."""

    warmup_seconds: float  # warm-up calls after the first (tracing) call
    chunk_seconds: float  # each timed chunk lasts at least this long and MIN_CHUNK_CALLS calls
    chunks: int  # per mode (step-only, with pipeline), alternating
    pipeline_seconds: float  # the pipeline alone


FULL_TIMING = Timing(warmup_seconds=2.0, chunk_seconds=1.5, chunks=5, pipeline_seconds=1.0)
QUICK_TIMING = Timing(warmup_seconds=0.3, chunk_seconds=0.5, chunks=2, pipeline_seconds=0.3)
MIN_CHUNK_CALLS = 3


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The ``meta_train`` run of the training-loop measurement (``train.Config`` fields)."""

    meta_batch_size: int = 4
    steps: int = 5
    iterations: int = 500
    eval_every: int = 250
    eval_episodes: int = 200
    test_episodes: int = 200


QUICK_LOOP = LoopSettings(iterations=20, eval_every=10, eval_episodes=20, test_episodes=20)
LONG_RUN_SECONDS = 780.0  # the README's 13-minute example run (its time budget)


# -- set-up shared by the workers -------------------------------------------------------------------

def import_tensorflow(device: str) -> tuple[Any, int]:
    """TensorFlow, and the number of GPUs it sees; with ``device='cpu'`` they are hidden (before any
    op runs), so the process computes and allocates on the CPU only."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    elif not gpus:
        raise RuntimeError("--worker gpu: TensorFlow sees no GPU.")
    return tf, len(gpus)


def load_splits() -> Any:
    from hyper_repr import data

    return data.load_omniglot(DATA_DIR, test_alphabets=list(TEST_ALPHABETS), val_alphabets=list(VAL_ALPHABETS))


def training_episodes(splits: Any, meta_batch_size: int, first_episode: int = 0) -> Any:
    """The meta-training stream of ``hyper_repr.train`` (seed 0, disjoint sampling)."""
    from hyper_repr import data

    return data.episode_dataset(splits.train, ways=WAYS, shots=SHOTS, queries=QUERIES, seed=SEED,
                                meta_batch_size=meta_batch_size, first_episode=first_episode)


# -- worker 1: one (device, B, T) -----------------------------------------------------------------------

@dataclasses.dataclass
class Measurement:
    device: str  # "cpu" or "gpu"
    meta_batch_size: int  # B
    steps: int  # T
    step_rates: list[float]  # episodes/s of each step-only chunk
    pipeline_rates: list[float]  # episodes/s of each chunk fed by the live pipeline
    step_ms: list[float]  # every timed step-only call
    pipeline_step_ms: list[float]  # every timed call fed by the pipeline, next() included
    step_cpu_ms: list[float]  # CPU ms of the process (all threads) per step-only call, per chunk
    pipeline_cpu_ms: list[float]  # the same fed by the pipeline (its threads included)
    pipeline_alone_ms: float  # median ms per next(iterator) without compute
    first_batch_s: float  # first meta-batch of the stream from episode 0 (pipeline start-up)
    resumed_first_batch_s: float  # first meta-batch of a stream resumed at RESUME_EPISODE
    first_call_s: float  # tracing + one meta-step
    setup_s: float  # imports, data loading, pre-drawing, the learner
    baseline_mb: float  # max RSS after the set-up
    memory_mb: float  # peak RSS above the baseline
    gpu_peak_mb: Optional[float]  # TF's peak device memory (GPU only)
    gpus_visible: int  # GPUs TensorFlow sees on this machine (hidden in CPU workers)
    tensorflow: str
    load_average: float  # 1-min load average at the end (other processes)


def chunk(call: Callable[[], None], seconds: float) -> tuple[int, float, float, list[float]]:
    """Calls ``call`` for at least ``seconds`` and MIN_CHUNK_CALLS calls: (calls, seconds, CPU
    seconds of the process, ms per call)."""
    times, start, cpu = [], time.perf_counter(), time.process_time()
    while len(times) < MIN_CHUNK_CALLS or time.perf_counter() - start < seconds:
        times.append(1e3 * timed(call))
    return len(times), time.perf_counter() - start, time.process_time() - cpu, times


def measure(device: str, meta_batch_size: int, steps: int, timing: Timing) -> Measurement:
    """First call, warm-up, alternating step-only and pipeline chunks, the pipeline alone, memory."""
    start = time.perf_counter()
    tf, gpus = import_tensorflow(device)
    from hyper_repr import meta_learner
    from hyper_repr.models import build_network

    splits = load_splits()
    iterator = iter(training_episodes(splits, meta_batch_size))
    first_batch_s = timed(lambda: next(iterator))
    batches = [next(iterator) for _ in range(PRE_DRAWN)]
    live = iter(training_episodes(splits, meta_batch_size, first_episode=(PRE_DRAWN + 1) * meta_batch_size))
    network = build_network("omniglot", tuple(splits.train.images.shape[1:]), seed=SEED, dtype="float32")
    learner = meta_learner.MetaLearner(network, ways=WAYS, meta_batch_size=meta_batch_size, steps=steps,
                                       learning_rate=LEARNING_RATE, learn_lr=LEARN_LR)
    setup_s = time.perf_counter() - start
    if device == "gpu":
        tf.config.experimental.reset_memory_stats("GPU:0")
    baseline = max_rss_mb()

    position = [0]

    def step_only() -> None:
        learner.meta_step(batches[position[0] % PRE_DRAWN])
        position[0] += 1

    def with_pipeline() -> None:
        learner.meta_step(next(live))

    first_call_s = timed(step_only)
    warm_until = time.perf_counter() + timing.warmup_seconds
    while time.perf_counter() < warm_until:
        step_only()
    for _ in range(MIN_CHUNK_CALLS):  # starts the live pipeline's threads and fills its buffer
        with_pipeline()

    step_rates, pipeline_rates, step_ms, pipeline_step_ms, step_cpu, pipeline_cpu = [], [], [], [], [], []
    modes = ((step_only, step_rates, step_ms, step_cpu), (with_pipeline, pipeline_rates, pipeline_step_ms,
                                                          pipeline_cpu))
    for c in range(timing.chunks):
        for call, rates, times, cpu_ms in (modes if c % 2 == 0 else modes[::-1]):
            calls, seconds, cpu_seconds, ms = chunk(call, timing.chunk_seconds)
            rates.append(calls * meta_batch_size / seconds)
            times.extend(ms)
            cpu_ms.append(1e3 * cpu_seconds / calls)

    fresh = iter(training_episodes(splits, meta_batch_size, first_episode=10 * RESUME_EPISODE))
    next(fresh)  # start-up, then the steady production rate
    pipeline_alone = chunk(lambda: next(fresh), timing.pipeline_seconds)[3]
    resumed = iter(training_episodes(splits, meta_batch_size, first_episode=RESUME_EPISODE))
    resumed_first_batch_s = timed(lambda: next(resumed))

    gpu_peak = (tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if device == "gpu" else None)
    return Measurement(device, meta_batch_size, steps, step_rates, pipeline_rates, step_ms, pipeline_step_ms,
                       step_cpu, pipeline_cpu, statistics.median(pipeline_alone), first_batch_s,
                       resumed_first_batch_s, first_call_s, setup_s, baseline, max_rss_mb() - baseline, gpu_peak,
                       gpus, tf.__version__, os.getloadavg()[0])


# -- worker 2: the training loop, instrumented from outside -----------------------------------------

@dataclasses.dataclass
class LoopMeasurement:
    settings: dict  # LoopSettings
    durations: dict  # component -> seconds of each call, in order (see `measure_loop`)
    cpu: dict  # component -> CPU seconds of the process (all threads) of each call
    setup_s: float  # meta_train's start up to the loop: network, learner, restore, validation pipeline
    loop_s: float  # the loop: from its first next() to the meta-test (the final save included)
    loop_cpu_s: float  # CPU seconds of the process in the loop
    meta_test_s: float  # the meta-test after training (not part of the rate)
    total_s: float  # the whole meta_train call
    elapsed_s: float  # meta_train's own elapsed training time (its results.json)
    logged: list  # the metrics.csv rows (iteration, elapsed_seconds, …) given to the callback
    checkpoint_mb: float  # size of the checkpoint folder at the end
    baseline_mb: float
    loop_memory_mb: float  # peak RSS above the baseline at the end of the loop (before the meta-test)
    memory_mb: float  # peak RSS above the baseline at the end (meta-test included)
    load_average: float
    outside_ms: list[float]  # the same learner's meta_step(next batch) after meta_train, per call
    outside_cpu_ms: float  # CPU ms per call of those


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process)."""
    return time.perf_counter(), time.process_time()


def measure_loop(settings: LoopSettings) -> LoopMeasurement:
    """``train.meta_train`` with its ``_restore``, ``_train_batches`` and ``_test`` wrapped by timers.

    Components (wall and CPU seconds of each call): ``meta_step`` (the learner's, in the loop),
    ``next_batch`` (the next training meta-batch), ``evaluate`` (validation), ``save`` (checkpoints,
    the final one included), ``callback`` (meta_train's metrics callback, a list append here); the
    meta-test's own evaluations are excluded from them. Then, in the same process, the same
    learner's ``meta_step(next batch)`` outside the loop.
    """
    import_tensorflow("cpu")
    from hyper_repr import train

    splits = load_splits()
    config = train.Config(steps=settings.steps, learning_rate=LEARNING_RATE, learn_lr=LEARN_LR,
                          meta_batch_size=settings.meta_batch_size, iterations=settings.iterations,
                          eval_every=settings.eval_every, eval_episodes=settings.eval_episodes,
                          test_episodes=settings.test_episodes, test_shots=(SHOTS,), seed=SEED)
    names = ("meta_step", "next_batch", "evaluate", "save", "callback")
    durations: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    marks: dict[str, tuple[float, float]] = {}
    in_loop, raw_step, loop_peak = [True], [], []

    def record(name: str, begin: tuple[float, float]) -> None:
        if in_loop[0]:
            end = clock()
            durations[name].append(end[0] - begin[0])
            cpu[name].append(end[1] - begin[1])

    def timer(name: str, fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            begin = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                record(name, begin)
        return call

    restore, train_batches, test = train._restore, train._train_batches, train._test

    def timed_restore(*args: Any, **kwargs: Any) -> Any:
        run = restore(*args, **kwargs)
        raw_step.append(run.learner.meta_step)
        run.learner.meta_step = timer("meta_step", run.learner.meta_step)
        run.learner.evaluate = timer("evaluate", run.learner.evaluate)
        run.manager.save = timer("save", run.manager.save)
        return run

    def timed_batches(*args: Any, **kwargs: Any) -> Any:
        batches = train_batches(*args, **kwargs)
        marks["loop_start"] = clock()  # at the first next(): the loop's first iteration
        while True:
            begin = clock()
            batch = next(batches)
            record("next_batch", begin)
            yield batch

    def timed_test(*args: Any, **kwargs: Any) -> Any:
        marks["loop_end"] = clock()
        loop_peak.append(max_rss_mb())
        in_loop[0] = False
        try:
            return test(*args, **kwargs)
        finally:
            marks["test_end"] = clock()

    train._restore, train._train_batches, train._test = timed_restore, timed_batches, timed_test
    logged: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="meta_training_") as workdir:
        baseline = max_rss_mb()
        start = time.perf_counter()
        results = train.meta_train(config, workdir, splits, callback=timer("callback", logged.append))
        total_s = time.perf_counter() - start
        checkpoint_mb = sum(f.stat().st_size for f in (Path(workdir) / "checkpoints").iterdir()) / 2**20
    memory_mb = max_rss_mb() - baseline
    # The same learner's meta_step outside meta_train, fed by a fresh stream of the same pipeline.
    batches = iter(training_episodes(splits, settings.meta_batch_size, first_episode=RESUME_EPISODE))
    raw_step[0](next(batches))
    calls = max(MIN_CHUNK_CALLS, settings.iterations // 5)
    outside_cpu = time.process_time()
    outside = [1e3 * timed(lambda: raw_step[0](next(batches))) for _ in range(calls)]
    outside_cpu_ms = 1e3 * (time.process_time() - outside_cpu) / calls
    (loop_start, loop_start_cpu), (loop_end, loop_end_cpu) = marks["loop_start"], marks["loop_end"]
    return LoopMeasurement(dataclasses.asdict(settings), durations, cpu, loop_start - start, loop_end - loop_start,
                           loop_end_cpu - loop_start_cpu, marks["test_end"][0] - loop_end, total_s,
                           results["elapsed_seconds"], logged, checkpoint_mb, baseline, loop_peak[0] - baseline,
                           memory_mb,
                           os.getloadavg()[0], outside, outside_cpu_ms)


# -- the driver ----------------------------------------------------------------------------------------

def run_worker(arguments: Sequence[str], label: str) -> dict:
    """One worker in a fresh Python process (its own memory baseline and peak); its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=WORKER_ENV, cwd=REPOSITORY)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


@dataclasses.dataclass
class Summary:
    """One (device, B, T)."""

    device: str
    meta_batch_size: int
    steps: int
    step_episodes_per_s: float  # median over chunks
    pipeline_episodes_per_s: float  # median over chunks
    pipeline_cost: float  # 1 − pipeline / step-only rate
    step_spread: float  # (max − min) / median of the step-only chunk rates
    ms_per_step: float  # median step-only call
    cpu_ms_per_step: float  # CPU ms (all threads) per step-only call, median over chunks
    pipeline_cpu_ms_per_step: float  # the same fed by the pipeline
    ms_per_episode: float
    pipeline_alone_ms: float  # next(iterator) alone, per meta-batch
    first_call_s: float
    peak_mb: float  # peak RSS above the baseline
    gpu_peak_mb: Optional[float]
    baseline_mb: float
    first_batch_s: float
    resumed_first_batch_s: float
    load_average: float


def summarize(m: Measurement) -> Summary:
    step, pipe = statistics.median(m.step_rates), statistics.median(m.pipeline_rates)
    ms = statistics.median(m.step_ms)
    return Summary(m.device, m.meta_batch_size, m.steps, step, pipe, 1 - pipe / step,
                   (max(m.step_rates) - min(m.step_rates)) / step, ms, statistics.median(m.step_cpu_ms),
                   statistics.median(m.pipeline_cpu_ms), ms / m.meta_batch_size, m.pipeline_alone_ms,
                   m.first_call_s, m.memory_mb, m.gpu_peak_mb, m.baseline_mb, m.first_batch_s,
                   m.resumed_first_batch_s, m.load_average)


def is_reference(s: Summary) -> bool:
    return (s.meta_batch_size, s.steps) == (REFERENCE["meta_batch_size"], REFERENCE["steps"])


def speed_report(summaries: Sequence[Summary], info: dict, args: argparse.Namespace) -> list[str]:
    reference = REFERENCE["episodes_per_second"]
    rows = []
    for s in summaries:
        ref = is_reference(s)
        rows.append([s.device, str(s.meta_batch_size), str(s.steps), f"{s.step_episodes_per_s:.1f}",
                     f"{s.pipeline_episodes_per_s:.1f}", f"{100 * s.pipeline_cost:+.0f}%", f"{s.ms_per_step:.1f}",
                     f"{s.cpu_ms_per_step:.0f} / {s.pipeline_cpu_ms_per_step:.0f}",
                     f"{s.ms_per_episode:.1f}", f"{s.pipeline_alone_ms:.2f}", f"{s.first_call_s:.1f}",
                     f"{s.peak_mb:.0f}", fmt(s.gpu_peak_mb, ".0f"), f"{reference:g}" if ref else "",
                     f"{s.step_episodes_per_s / reference:.2f}" if ref else "",
                     f"{s.pipeline_episodes_per_s / reference:.2f}" if ref else "", f"{s.load_average:.1f}"])
    resumed = max(s.resumed_first_batch_s for s in summaries)
    started = max(s.first_batch_s for s in summaries)
    lines = [
        "Meta-training speed of hyper_repr.MetaLearner.meta_step, Omniglot 5-way 1-shot (15 queries per class),",
        f"  float32, learned η (initial {LEARNING_RATE}); TF {info['tensorflow']}, Keras {info['keras']}, Python "
        f"{info['python']}; {info['cpu_count']} CPUs ({info['cpu']});",
        f"  1-min load average {info['load_average'][0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end. Rates: "
        f"median over {args.timing.chunks} chunks of ≥ {args.timing.chunk_seconds:g} s per mode (alternating),",
        f"  after the first call and {args.timing.warmup_seconds:g} s of warm-up; one fresh process per row.",
        "",
        table(["device", "B", "T", "episodes/s", "+pipeline", "pipe cost", "ms/step", "CPU ms/step", "ms/episode",
               "pipe ms/batch", "first call s", "peak MB", "GPU MB", "PyTorch", "ratio", "ratio+pipe", "load"], rows),
        "  episodes/s: meta_step alone on pre-drawn meta-batches; +pipeline: fed by the live episode_dataset;",
        "  pipe cost: 1 − (+pipeline)/(episodes/s); CPU ms/step: CPU time of the process (all threads) per step,",
        "  step-only / +pipeline (less sensitive to other processes than wall time; with 2 busy threads up to",
        "  2 × ms/step); pipe ms/batch: next(iterator) alone; first call: tracing + one step; peak MB: peak RSS",
        "  above the process's baseline after imports and data; GPU MB: TF's peak device memory; load: the",
        "  1-min load average (2 CPUs).",
        f"  PyTorch: the reference ({REFERENCE['name']}, the same model and episodes, T = {REFERENCE['steps']}, "
        f"B = {REFERENCE['meta_batch_size']}, this machine idle);",
        "  ratio = hyper_repr / PyTorch, step-only and with the pipeline (> 1: hyper_repr is faster).",
        f"  The first meta-batch of a stream takes ≤ {started:.3f} s from episode 0 and ≤ {resumed:.3f} s from "
        f"episode {RESUME_EPISODE:,} (resuming skips nothing).",
    ]
    return lines


def loop_breakdown(m: LoopMeasurement) -> dict:
    """The loop's time split into its components (wall and CPU seconds), and the rates derived."""
    d, c, s = m.durations, m.cpu, m.settings
    B, iterations, median = s["meta_batch_size"], s["iterations"], statistics.median
    rest = lambda values: values[1:] or values  # noqa: E731  (the calls after the first, tracing one)
    other = m.loop_s - sum(sum(v) for v in d.values())
    other_cpu = m.loop_cpu_s - sum(sum(v) for v in c.values())
    quarter = max(1, len(d["meta_step"]) // 4)
    step_ms, next_ms = 1e3 * median(rest(d["meta_step"])), 1e3 * median(rest(d["next_batch"]))
    step_cpu_ms, next_cpu_ms = 1e3 * median(rest(c["meta_step"])), 1e3 * median(rest(c["next_batch"]))
    per_iteration = (sum(rest(d["meta_step"])) + sum(d["next_batch"]) + other) / iterations
    per_evaluation = median(rest(d["evaluate"])) + median(d["save"])
    fixed = d["meta_step"][0] - median(rest(d["meta_step"])) + d["evaluate"][0] - median(rest(d["evaluate"]))
    # the iterations N of a LONG_RUN_SECONDS run: fixed + N·per_iteration + (N / eval_every)·per_evaluation = time
    long_run = (LONG_RUN_SECONDS - fixed) / (per_iteration + per_evaluation / s["eval_every"])
    steady = iterations * (step_ms + next_ms) / 1e3  # the loop at the median step and batch times
    excess = {  # the loop's time beyond `steady`, by cause (they add up to loop_s − steady)
        "tracing": d["meta_step"][0] - step_ms / 1e3,
        "validation": sum(d["evaluate"]),
        "checkpoints": sum(d["save"]),
        "rest": other + sum(d["callback"]),
        "step_time_spread": sum(rest(d["meta_step"])) + sum(d["next_batch"]) - (iterations - 1) * step_ms / 1e3
        - iterations * next_ms / 1e3,
    }
    return {
        "episodes": B * iterations,
        "loop_episodes_per_s": B * iterations / m.loop_s,
        "elapsed_episodes_per_s": B * iterations / m.elapsed_s,
        "logged_episodes_per_s": [B * row["iteration"] / row["elapsed_seconds"] for row in m.logged],
        "steady_episodes_per_s": 1e3 * B / (step_ms + next_ms),  # meta_step + next, medians
        "outside_ms": median(m.outside_ms),
        "outside_episodes_per_s": 1e3 * B / median(m.outside_ms),
        "components": {  # name -> (wall s, CPU s, calls)
            "meta_step_first": (d["meta_step"][0], c["meta_step"][0], 1),
            "meta_step_rest": (sum(rest(d["meta_step"])), sum(rest(c["meta_step"])), len(d["meta_step"]) - 1),
            "next_batch": (sum(d["next_batch"]), sum(c["next_batch"]), len(d["next_batch"])),
            "evaluate": (sum(d["evaluate"]), sum(c["evaluate"]), len(d["evaluate"])),
            "save": (sum(d["save"]), sum(c["save"]), len(d["save"])),
            "callback": (sum(d["callback"]), sum(c["callback"]), len(d["callback"])),
            "other": (other, other_cpu, iterations),
        },
        "meta_step_ms": step_ms,
        "meta_step_cpu_ms": step_cpu_ms,
        "meta_step_ms_quarters": [1e3 * median(d["meta_step"][max(1, i * quarter):(i + 1) * quarter])
                                  for i in range(4)] if len(d["meta_step"]) >= 8 else [],
        "next_batch_ms": next_ms,
        "next_batch_cpu_ms": next_cpu_ms,
        "evaluate_s": d["evaluate"],
        "save_s": d["save"],
        "other_ms_per_iteration": 1e3 * other / iterations,
        "loop_cpu_ms_per_iteration": 1e3 * m.loop_cpu_s / iterations,
        "loop_cpu_overhead": m.loop_cpu_s / (iterations * (step_cpu_ms + next_cpu_ms) / 1e3) - 1,
        "long_run_episodes_per_s": B * long_run / LONG_RUN_SECONDS,
        "long_run_fixed_s": fixed,
        "steady_s": steady,
        "excess_s": excess,
    }


def loop_report(m: LoopMeasurement, b: dict, summaries: Sequence[Summary]) -> list[str]:
    s, parts = m.settings, b["components"]
    raw = next((x for x in summaries if x.device == "cpu" and x.meta_batch_size == s["meta_batch_size"]
                and x.steps == s["steps"]), None)

    def row(label: str, name: str, per_call: str) -> list[str]:
        wall, cpu, calls = parts[name]
        return [label, f"{wall:.2f}", fmt(cpu, ".2f"), f"{100 * wall / m.loop_s:.1f}%", str(calls), per_call]

    ev, sv = b["evaluate_s"], b["save_s"]
    rows = [row("meta_step, first call (tracing)", "meta_step_first", f"{parts['meta_step_first'][0]:.2f} s"),
            row("meta_step, other calls", "meta_step_rest",
                f"{b['meta_step_ms']:.1f} ms, CPU {b['meta_step_cpu_ms']:.0f} ms (medians)"),
            row("next training meta-batch", "next_batch",
                f"{b['next_batch_ms']:.2f} ms, CPU {b['next_batch_cpu_ms']:.2f} ms (medians)"),
            row("validation evaluate", "evaluate", " / ".join(f"{x:.2f}" for x in ev) + " s"),
            row("checkpoint save", "save", " / ".join(f"{x:.3f}" for x in sv) + " s"),
            row("metrics callback", "callback", "-"),
            row("rest: Python, tf.Variable ops, csv", "other", f"{b['other_ms_per_iteration']:.2f} ms / iteration"),
            ["loop", f"{m.loop_s:.2f}", f"{m.loop_cpu_s:.2f}", "100%", "", ""]]
    reference = REFERENCE["episodes_per_second"]
    rates = [("meta_train loop overall", b["loop_episodes_per_s"]),
             ("meta_train's own elapsed time", b["elapsed_episodes_per_s"]),
             *((f"meta_train's logged rate at iteration {r['iteration']}", v)
               for r, v in zip(m.logged, b["logged_episodes_per_s"])),
             ("in the loop: meta_step + next batch (medians)", b["steady_episodes_per_s"]),
             ("same process after meta_train: meta_step(next batch), median", b["outside_episodes_per_s"]),
             (f"projected: a {LONG_RUN_SECONDS:g}-s run with these components", b["long_run_episodes_per_s"])]
    if raw is not None:
        rates += [("benchmark above: step-only (1)", raw.step_episodes_per_s),
                  ("benchmark above: with pipeline (2)", raw.pipeline_episodes_per_s)]
    quarters = " / ".join(f"{x:.1f}" for x in b["meta_step_ms_quarters"]) or "-"
    return ["", f"Training loop: hyper_repr.train.meta_train, B = {s['meta_batch_size']}, T = {s['steps']}, "
            f"{s['iterations']} iterations, validation every {s['eval_every']} on {s['eval_episodes']} episodes, "
            "checkpoints at each validation and at the end",
            table(["component", "s", "CPU s", "of loop", "calls", "per call"], rows),
            f"  CPU s: CPU time of the process (all threads). The loop costs {b['loop_cpu_ms_per_iteration']:.0f} "
            f"CPU ms per iteration, {100 * b['loop_cpu_overhead']:+.0f}% over meta_step + next batch (medians, "
            "tracing and validation included);",
            f"  outside the loop the same step costs {m.outside_cpu_ms:.0f} CPU ms.",
            f"  The loop took {m.loop_s - b['steady_s']:.1f} s more than {s['iterations']} × (median meta_step + "
            "median next batch): " + ", ".join(f"{name.replace('_', ' ')} {v:.1f} s ({100 * v / m.loop_s:.1f}%)"
                                               for name, v in b["excess_s"].items()) + ".",
            f"  meta_step median by quarter of the loop: {quarters} ms. Set-up before the loop {m.setup_s:.2f} s; "
            f"meta-test after it {m.meta_test_s:.2f} s",
            f"  (3 × {s['test_episodes']} episodes; neither is in the rates); checkpoints {m.checkpoint_mb:.1f} MB; "
            f"peak RSS above the process's baseline before meta_train:",
            f"  +{m.loop_memory_mb:.0f} MB in the loop, +{m.memory_mb:.0f} MB with the meta-test; load "
            f"{m.load_average:.1f}.",
            "", table(["episodes/s", "", f"vs PyTorch {reference:g}"],
                      [[name, f"{v:.1f}", f"{v / reference:.2f}"] for name, v in rates]),
            f"  projected: {b['long_run_fixed_s']:.1f} s of one-off tracing (first meta_step and evaluate, beyond a "
            f"steady call), then per iteration meta_step + next + rest, and every {s['eval_every']} iterations one "
            "evaluate + one save."]


def write_results(prefix: Path, summaries: Sequence[Summary], measurements: Sequence[Measurement],
                  loop: Optional[LoopMeasurement], breakdown: Optional[dict], meta: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        fields = [field.name for field in dataclasses.fields(Summary)]
        writer = csv.DictWriter(f, fieldnames=fields + ["reference_episodes_per_s", "ratio_step", "ratio_pipeline"])
        writer.writeheader()
        for s in summaries:
            reference = REFERENCE["episodes_per_second"] if is_reference(s) else None
            writer.writerow({**dataclasses.asdict(s), "reference_episodes_per_s": reference,
                             "ratio_step": reference and s.step_episodes_per_s / reference,
                             "ratio_pipeline": reference and s.pipeline_episodes_per_s / reference})
    with open(prefix.with_suffix(".json"), "w") as f:
        json.dump({**meta, "reference": REFERENCE, "summary": [dataclasses.asdict(s) for s in summaries],
                   "measurements": [dataclasses.asdict(m) for m in measurements],
                   "training_loop": loop and {**dataclasses.asdict(loop), "breakdown": breakdown}}, f, indent=1)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta-batch-sizes", type=int, nargs="+",
                        help=f"the meta-batch sizes B (default {DEFAULT_BATCH_SIZES})")
    parser.add_argument("--steps", type=int, nargs="+", help=f"the head steps T (default {DEFAULT_STEPS})")
    parser.add_argument("--loop-iterations", type=int,
                        help=f"iterations of the meta_train run (default {LoopSettings.iterations}; 0 skips it)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: B in {QUICK_BATCH_SIZES}, T in {QUICK_STEPS}, short timing, "
                             f"a {QUICK_LOOP.iterations}-iteration loop")
    parser.add_argument("--worker", choices=("cpu", "gpu"), help=argparse.SUPPRESS)
    parser.add_argument("--loop-worker", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.meta_batch_sizes = sorted(set(args.meta_batch_sizes or (QUICK_BATCH_SIZES if args.quick
                                                                 else DEFAULT_BATCH_SIZES)))
    args.steps = sorted(set(args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)))
    args.timing = QUICK_TIMING if args.quick else FULL_TIMING
    args.loop = QUICK_LOOP if args.quick else LoopSettings()
    if args.loop_iterations is not None:
        args.loop = dataclasses.replace(args.loop, iterations=args.loop_iterations)
    if min(args.meta_batch_sizes + args.steps) < 1 or args.loop.iterations < 0:
        parser.error("--meta-batch-sizes and --steps must be positive, --loop-iterations ≥ 0")
    return args


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if args.worker:  # internal: one (device, B, T) in this fresh process
        m = measure(args.worker, args.meta_batch_sizes[0], args.steps[0], args.timing)
        print(json.dumps(dataclasses.asdict(m)))
        return
    if args.loop_worker is not None:  # internal: the instrumented meta_train run
        print(json.dumps(dataclasses.asdict(measure_loop(LoopSettings(**args.loop_worker)))))
        return
    info = machine_info()
    quick = ["--quick"] if args.quick else []
    configs = [(B, T) for B in args.meta_batch_sizes for T in args.steps]
    measurements: list[Measurement] = []
    start = time.perf_counter()
    devices = ["cpu"]
    for device in devices:  # "gpu" is appended when a CPU worker saw one
        for i, (B, T) in enumerate(configs, 1):
            m = Measurement(**run_worker(["--worker", device, "--meta-batch-sizes", str(B), "--steps", str(T),
                                          *quick], f"{device} B={B} T={T}"))
            measurements.append(m)
            s = summarize(m)
            print(f"[{device} {i}/{len(configs)}] B={B:<3d} T={T:<3d} {s.step_episodes_per_s:6.1f} episodes/s  "
                  f"+pipeline {s.pipeline_episodes_per_s:6.1f}  {s.ms_per_step:7.1f} ms/step  first "
                  f"{s.first_call_s:5.1f} s  +{s.peak_mb:5.0f} MB  load {s.load_average:4.2f}  "
                  f"({time.perf_counter() - start:4.0f} s)", file=sys.stderr, flush=True)
            if m.gpus_visible and "gpu" not in devices:
                devices.append("gpu")
    summaries = [summarize(m) for m in measurements]
    loop = breakdown = None
    if args.loop.iterations > 0:
        s = args.loop
        print(f"[loop] meta_train B={s.meta_batch_size} T={s.steps}, {s.iterations} iterations ...",
              file=sys.stderr, flush=True)
        loop = LoopMeasurement(**run_worker(["--loop-worker", json.dumps(dataclasses.asdict(s))], "loop"))
        breakdown = loop_breakdown(loop)
        print(f"[loop] {breakdown['loop_episodes_per_s']:.1f} episodes/s over {loop.loop_s:.1f} s  "
              f"({time.perf_counter() - start:4.0f} s)", file=sys.stderr, flush=True)

    info["tensorflow"] = measurements[0].tensorflow
    info["devices"] = devices
    lines = speed_report(summaries, info, args)
    if loop is not None:
        lines += loop_report(loop, breakdown, summaries)
    print("\n".join(lines))
    prefix = RESULTS_DIR / ("meta_training_quick" if args.quick else "meta_training")
    write_results(prefix, summaries, measurements, loop, breakdown,
                  {"machine": info, "meta_batch_sizes": args.meta_batch_sizes, "steps": args.steps,
                   "timing": dataclasses.asdict(args.timing), "loop_settings": dataclasses.asdict(args.loop),
                   "episode": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "seed": SEED,
                               "learning_rate": LEARNING_RATE, "learn_lr": LEARN_LR,
                               "data": str(DATA_DIR.relative_to(REPOSITORY)),
                               "test_alphabets": TEST_ALPHABETS, "val_alphabets": VAL_ALPHABETS}})
    print(f"\nWrote {prefix.with_suffix('.csv')} and {prefix.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
