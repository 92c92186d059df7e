"""Meta-training speed of hyper-representation: episodes per second and memory, Omniglot 5-way 1-shot.

The subject is one hyper-iteration of ``hyper_repr.HyperRepresentation`` (its Keras
``train_step``: Algorithm 1 of Franceschi et al., ICML 2018): B episodes, each a logistic head
fitted by T steps of gradient descent on the support features of the Omniglot network (4 strided
conv-64 layers, 256 features, float32), the hypergradient of the mean query cross-entropy by
reverse mode through the T head steps, then an outer Adam step on the network's weights and the
learned head learning rate η:

    w_{j,t+1} = w_{j,t} − η ∇_w CE(h_λ(X^tr_j) W_{j,t} + b_{j,t}, Y^tr_j),   w_{j,0} = 0,  t < T
    E(λ, η) = (1/B) Σ_j CE(h_λ(X^val_j) W_{j,T} + b_{j,T}, Y^val_j),   (λ, η) ← Adam(∇E)

Episodes are those of training: 5-way 1-shot with 15 queries per class, drawn by the real
``hyper_repr.data.episode_dataset`` from the bundled Omniglot (``data/omniglot`` of the repository;
test alphabets Sanskrit and Tagalog, validation alphabet Early_Aramaic, as
the bundled-data run of ``flags/omniglot.py``, whose default settings are used too: η = 0.1,
learned, ``train.build_model``). Measured for every meta-batch size B ∈ {4, 16} and T ∈ {1, 5, 10},
each in a fresh process:

* step-only: episodes/s of ``model.train_on_batch`` on meta-batches pre-drawn from the pipeline
  (cycled): the training step alone;
* fit: episodes/s of Keras ``model.fit`` on the live ``episode_dataset``, i.e. what training gets
  (the next meta-batch read inside the train function, the callbacks' per-step work); its epochs
  alternate with the step-only chunks (run at each epoch's end), so load drifts hit both alike.
  Rates are the median over chunks (``Timing``: 5 chunks of ≥ 1.5 s per mode) after the first
  (tracing) call and 2 s of warm-up calls; ms per step is the median of the step-only calls.
  The process's CPU time per step (all threads, ``time.process_time``) is reported beside them: it
  varies less than wall time with the load of other processes on the shared machine;
* the pipeline alone: ms per meta-batch of ``next(iterator)`` without compute, and the latency of
  the first batch of a stream resumed at ``first_episode`` = 400,000 (it is a counter, not a skip);
* the first call's time (tracing + one step) and peak memory: peak RSS above the process's
  baseline after imports, data loading, the pre-drawn batches and the (untraced) model; on a
  GPU also TF's peak device memory.

CPU processes hide any GPU; when one is visible to TensorFlow, every configuration runs again on
it (device column "gpu"). The PyTorch subject, measured in the same run: ``TorchMetaLearner``, the
same meta-learner written in PyTorch (the same network, padding, transductive normalisation, heads,
η and outer Adam), differentiating through the unrolled heads as ``higher`` does. For every (B, T)
a fresh process, right after the TF one, times its meta-step like the step-only mode, on the same
pre-drawn meta-batches, with the same ``Timing`` (its chunks are all step-only), and reports its
peak RSS; the ratio hyper_repr / PyTorch is computed from the two rates of the run (the 1-minute
load average of each process is reported; PyTorch's OpenMP threads suffer far more than TF's pool
from competing processes, a step 10 times slower at nice 19 beside a 2-thread job, so compare on
an otherwise idle machine). First, a check process copies the TF network's initial
weights into it and compares E, ∇E and the first Adam update on one meta-batch (B = the first
meta-batch size, T = the largest), then ∇E of both run in float64 from the same weights: the
verdict "the same function" takes E in float32 and every hyperparameter's ∇E in float64 (the
float32 gradients of two correct ReLU networks can differ by 1 % where a normalised value lies
within round-off of the kink, which flips its mask). PyTorch is not a dependency (its Linux wheel
on PyPI brings CUDA): ``pip install torch --index-url https://download.pytorch.org/whl/cpu``
installs the CPU build; without it the script says so and skips the subject.

Then the launchers' training run, ``hyper_repr.train.meta_train`` (Keras ``fit`` with the
launchers' callbacks: B = 4, T = 5, 500 iterations, an epoch of 250 iterations ended by a
validation on 200 episodes, metrics.csv, TensorBoard, best.keras and a checkpoint, then the
meta-test on 3 × 200 test episodes), in a temporary workdir of a fresh process, timed by a Keras
callback given to ``meta_train`` (``loop_timer``: each step, what runs between steps, each
validation and each epoch end, wall and CPU). Reported: fit's episodes/s (overall, by
meta_train's own elapsed time and its metrics.csv), each component's time, fit's time beyond N ×
the median step by cause, the same model's step outside fit in the same process, and the
projected rate of a 240-s run (the budget of the README's main job) from the measured components.

Run from the repository root (about 10 minutes on 2 cores at load 3-5 with the PyTorch subject,
less when idle; ``--quick``: B = 4, T ∈ {1, 5}, short timing and a 20-iteration loop, a smoke run
of about 2 minutes on an idle machine):

    python -m benchmarks.meta_training          # or: python benchmarks/meta_training.py
    python -m benchmarks.meta_training --meta-batch-sizes 4 --steps 5 --loop-iterations 2000
    python -m benchmarks.meta_training --quick
    python -m benchmarks.meta_training --side-by-side   # hyper_repr / PyTorch, alternating in one process

``--side-by-side`` (about 4 minutes) runs, instead of the tables, the check and one process per
(B, T) that builds both learners and alternates their steps on the same pre-drawn meta-batches
(``measure_pair``): the median ratio of adjacent steps, which the drifts of a shared machine
move far less than the rates of separate processes (rows of the tables move by 10-20 % between
runs, PyTorch's with them); after each pair, the network's forward and backward passes alone on
the same meta-batch (``network_passes``), whose time bounds hyper_repr's step from below: PyTorch's
step over it is the best ratio any head, loss or update code could give.

Progress goes to stderr, the tables to stdout; the results are written to
``benchmarks/results/meta_training[_quick].{csv,json}`` (``meta_training_side_by_side[_quick].json``).
The worker modes (``--worker cpu|gpu|torch|check|pair`` with one B and T, ``--loop-worker``) are
internal: they print one JSON line.

References:
    Franceschi, Frasconi, Salzo, Grazzi, Pontil. Bilevel Programming for Hyperparameter
    Optimization and Meta-Learning. ICML 2018, arXiv:1806.04910.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

if not __package__:  # run as a script: the repository's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import harness  # noqa: E402
from benchmarks.harness import fmt, max_rss_mb, table, timed  # noqa: E402

REPOSITORY = Path(__file__).resolve().parent.parent
DATA_DIR = REPOSITORY / "data" / "omniglot"
TEST_ALPHABETS, VAL_ALPHABETS = ("Sanskrit", "Tagalog"), ("Early_Aramaic",)
WAYS, SHOTS, QUERIES, SEED = 5, 1, 15, 0
LEARNING_RATE, LEARN_LR = 0.1, True  # flags/omniglot.py's defaults
DEFAULT_BATCH_SIZES, DEFAULT_STEPS = (4, 16), (1, 5, 10)
QUICK_BATCH_SIZES, QUICK_STEPS = (4,), (1, 5)
META_LR, META_LR_DECAY = 1e-3, 1e-5  # the launchers' outer Adam: meta_lr / (1 + decay·iteration)
ADAM_EPSILON, ADAM_BETA2 = 1e-7, 0.999  # Keras's Adam defaults
NORM_EPSILON, MIN_LR = 1e-3, 1e-6  # TransductiveBatchNormalization's ε; η's constraint η ≥ 1e-6
CHECK_TOLERANCE = 1e-4  # relative: E of hyper_repr and the PyTorch subject in float32
# relative, every hyperparameter's ∇E of both in float64: float32 gradients can differ by far more where a
# normalised value lies within round-off of a ReLU kink (its mask flips), which float64 settles
FLOAT64_TOLERANCE = 1e-9
PRE_DRAWN = 16  # meta-batches drawn before timing, cycled by the step-only calls
RESUME_EPISODE = 400_000  # first_episode of the resumed stream (iteration 100,000 at B = 4)
TARGET_RATIO = 2.0  # the target: hyper_repr ≥ 2 × the PyTorch subject's episodes/s


@dataclasses.dataclass(frozen=True)
class Timing:
    """How long each configuration is timed."""

    warmup_seconds: float  # warm-up calls after the first (tracing) call
    chunk_seconds: float  # each timed chunk lasts at least this long and MIN_CHUNK_CALLS calls
    chunks: int  # per mode (fit, step-only), alternating
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
LONG_RUN_SECONDS = 240.0  # the time budget of the README's main job


# -- set-up shared by the workers -------------------------------------------------------------------

def import_tensorflow(device: str) -> tuple[Any, int]:
    """TensorFlow, and the number of GPUs it sees; with ``device='cpu'`` they are hidden (before any
    op runs), so the process computes and allocates on the CPU only. ``far_ho2.cpu_kernels`` comes
    first, as in every far_ho2 program."""
    import far_ho2.cpu_kernels  # noqa: F401
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


def build_model(steps: int, splits: Any) -> Any:
    """The compiled ``hyper_repr.HyperRepresentation`` of the launchers' defaults (``train.build_model``):
    the Omniglot network (float32, seed 0), η = 0.1 learned, outer Adam with inverse-time decay."""
    from hyper_repr import train

    config = train.Config(ways=WAYS, shots=SHOTS, queries=QUERIES, steps=steps, learning_rate=LEARNING_RATE,
                          learn_lr=LEARN_LR, meta_lr=META_LR, meta_lr_decay=META_LR_DECAY, seed=SEED)
    return train.build_model(config, splits)


# -- worker 1: one (device, B, T) -----------------------------------------------------------------------

@dataclasses.dataclass
class Measurement:
    device: str  # "cpu" or "gpu"
    meta_batch_size: int  # B
    steps: int  # T
    step_rates: list[float]  # episodes/s of each step-only chunk (train_on_batch, pre-drawn)
    fit_rates: list[float]  # episodes/s of each fit epoch on the live pipeline
    step_ms: list[float]  # every timed step-only call
    fit_step_ms: list[float]  # every step in fit (batch begin to end: the next batch included)
    step_cpu_ms: list[float]  # CPU ms of the process (all threads) per step-only call, per chunk
    fit_cpu_ms: list[float]  # the same per step of each fit epoch (the pipeline's threads included)
    pipeline_alone_ms: float  # median ms per next(iterator) without compute
    first_batch_s: float  # first meta-batch of the stream from episode 0 (pipeline start-up)
    resumed_first_batch_s: float  # first meta-batch of a stream resumed at RESUME_EPISODE
    first_call_s: float  # tracing + one hyper-iteration
    setup_s: float  # imports, data loading, pre-drawing, the model
    baseline_mb: float  # max RSS after the set-up
    memory_mb: float  # peak RSS above the baseline
    gpu_peak_mb: Optional[float]  # TF's peak device memory (GPU only)
    gpus_visible: int  # GPUs TensorFlow sees on this machine (hidden in CPU workers)
    tensorflow: str
    load_average: float  # 1-min load average at the end (other processes)
    flops_per_step: float = 0.0  # the step's counted arithmetic (``step_flops``)
    peak_gflops: float = 0.0  # this machine's measured peak, in the same process (``harness.peak_gflops``)
    profile: Optional[dict] = None  # ``harness.Profile`` of PROFILE_CALLS step-only calls


def chunk(call: Callable[[], None], seconds: float) -> tuple[int, float, float, list[float]]:
    """Calls ``call`` for at least ``seconds`` and MIN_CHUNK_CALLS calls: (calls, seconds, CPU
    seconds of the process, ms per call)."""
    times, start, cpu = [], time.perf_counter(), time.process_time()
    while len(times) < MIN_CHUNK_CALLS or time.perf_counter() - start < seconds:
        times.append(1e3 * timed(call))
    return len(times), time.perf_counter() - start, time.process_time() - cpu, times


def first_call_and_warm_up(call: Callable[[], None], seconds: float) -> float:
    """Times the first (tracing) call of ``call``, then calls it for ``seconds``; returns the
    first call's seconds."""
    first = timed(call)
    warm_until = time.perf_counter() + seconds
    while time.perf_counter() < warm_until:
        call()
    return first


def measure(device: str, meta_batch_size: int, steps: int, timing: Timing) -> Measurement:
    """First call, warm-up, then alternating chunks: a ``fit`` epoch on the live pipeline, then
    ``train_on_batch`` on pre-drawn meta-batches for as long; the pipeline alone; memory."""
    start = time.perf_counter()
    tf, gpus = import_tensorflow(device)
    import keras

    splits = load_splits()
    iterator = iter(training_episodes(splits, meta_batch_size))
    first_batch_s = timed(lambda: next(iterator))
    batches = [next(iterator) for _ in range(PRE_DRAWN)]
    live = training_episodes(splits, meta_batch_size, first_episode=(PRE_DRAWN + 1) * meta_batch_size)
    model = build_model(steps, splits)
    setup_s = time.perf_counter() - start
    if device == "gpu":
        tf.config.experimental.reset_memory_stats("GPU:0")
    baseline = max_rss_mb()

    position = [0]

    def step_only() -> None:
        model.train_on_batch(batches[position[0] % PRE_DRAWN])
        position[0] += 1

    first_call_s = first_call_and_warm_up(step_only, timing.warmup_seconds)
    per_step = statistics.median(timed(step_only) for _ in range(MIN_CHUNK_CALLS))
    steps_per_epoch = max(MIN_CHUNK_CALLS, math.ceil(timing.chunk_seconds / per_step))
    m = dict(step_rates=[], fit_rates=[], step_ms=[], fit_step_ms=[], step_cpu_ms=[], fit_cpu_ms=[])

    class Chunks(keras.callbacks.Callback):
        """Times each epoch of fit and its steps, then runs a step-only chunk at its end (epoch 0
        traces fit's function and starts the pipeline: not timed)."""

        def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
            self.epoch_start, self.steps = clock(), []

        def on_train_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
            self.step_start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
            self.steps.append(1e3 * (time.perf_counter() - self.step_start))

        def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
            (wall, cpu), (wall0, cpu0) = clock(), self.epoch_start
            if epoch == 0:
                return
            m["fit_rates"].append(steps_per_epoch * meta_batch_size / (wall - wall0))
            m["fit_cpu_ms"].append(1e3 * (cpu - cpu0) / steps_per_epoch)
            m["fit_step_ms"].extend(self.steps)
            calls, seconds, cpu_seconds, ms = chunk(step_only, timing.chunk_seconds)
            m["step_rates"].append(calls * meta_batch_size / seconds)
            m["step_ms"].extend(ms)
            m["step_cpu_ms"].append(1e3 * cpu_seconds / calls)

    model.fit(live, steps_per_epoch=steps_per_epoch, epochs=timing.chunks + 1, verbose=0, shuffle=False,
              callbacks=[Chunks()])

    fresh = iter(training_episodes(splits, meta_batch_size, first_episode=10 * RESUME_EPISODE))
    next(fresh)  # start-up, then the steady production rate
    pipeline_alone = chunk(lambda: next(fresh), timing.pipeline_seconds)[3]
    resumed = iter(training_episodes(splits, meta_batch_size, first_episode=RESUME_EPISODE))
    resumed_first_batch_s = timed(lambda: next(resumed))

    gpu_peak = (tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if device == "gpu" else None)
    where = harness.profile(step_only, PROFILE_CALLS, profile_categories(model.network.name))
    extra = dict(flops_per_step=step_flops(model.network, meta_batch_size, steps),
                 peak_gflops=harness.peak_gflops(), profile=dataclasses.asdict(where))
    return Measurement(device, meta_batch_size, steps, **m, pipeline_alone_ms=statistics.median(pipeline_alone),
                       first_batch_s=first_batch_s, resumed_first_batch_s=resumed_first_batch_s,
                       first_call_s=first_call_s, setup_s=setup_s, baseline_mb=baseline,
                       memory_mb=max_rss_mb() - baseline, gpu_peak_mb=gpu_peak, gpus_visible=gpus,
                       tensorflow=tf.__version__, load_average=os.getloadavg()[0], **extra)


def step_flops(network: Any, meta_batch_size: int, steps: int) -> float:
    """The arithmetic of one hyper-iteration, counted (multiply-adds as 2 operations): the network's
    convolutions and dense products on the B·N·(K + Q) images, forward and backward (the kernels'
    gradients, and the inputs' except for the first layer, whose input is the images), plus the
    heads' products: T steps of 2 products of B·NK×d by d×N forward, 4 per step in the reverse
    pass (a Hessian-vector and a mixed product), the query logits and their 2 backward products.
    Normalisations, activations and the optimizer's element-wise work are not counted."""
    import keras

    forward = backward = 0.0
    for layer in network.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            flops = 2.0 * h * w * cout * kh * kw * cin
            backward += flops * (1 if forward == 0 else 2)
            forward += flops
        elif isinstance(layer, keras.layers.Dense):
            flops = 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1]
            backward += 2 * flops
            forward += flops
    images = meta_batch_size * WAYS * (SHOTS + QUERIES)
    dim = int(network.output.shape[-1])
    head = 2.0 * meta_batch_size * dim * WAYS  # one product per example
    heads = steps * (2 + 4) * head * WAYS * SHOTS + 3 * head * WAYS * QUERIES
    return images * (forward + backward) + heads


PROFILE_CALLS = 10  # step-only calls under TensorFlow's profiler, after the timed chunks


def profile_categories(network_name: str) -> list[tuple[str, str]]:
    """``harness.profile``'s categories for a meta-training step, by the ops' name scopes. The T
    head steps are unrolled (T ≤ 16): their inner gradients and the reverse pass through them are
    gradients of the same operations, named alike, so they share a category."""
    network = re.escape(network_name)
    return [("network backward", f"^gradient_tape/.*{network}"), ("network forward", network),
            ("head steps and the reverse pass through them", "inner_run/|^reverse_pass/"),
            ("query loss", "outer/"), ("outer update", "update/"), ("guard", "guard/")]


# -- workers 2 and 3: the PyTorch subject and its check --------------------------------------------

def import_torch() -> Any:
    """PyTorch, on as many threads as CPUs."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def same_padding(size: int, kernel: int = 3, stride: int = 2) -> tuple[int, ...]:
    """TF's SAME padding of a square input as ``F.pad``'s (left, right, top, bottom): an odd
    padding puts the extra row and column at the end (28 → 14: 0 and 1; 7 → 4: 1 and 1)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2) * 2


class TorchMetaLearner:
    """``hyper_repr``'s meta-learner in PyTorch (float32), as a PyTorch user would write it with
    ``higher``: the T head steps are unrolled by ``torch.autograd.grad(..., create_graph=True)``
    and the query loss is back-propagated through them, which is what ``higher``'s differentiable
    optimisers do (the package itself is not needed). The function is hyper_repr's (the Omniglot
    network, ``HyperRepresentation(learning_rate=0.1, learn_lr=True)``, the launchers' Adam):

    * h_λ: 4 × [conv 3×3, stride 2, 64, no bias, TF's SAME padding → normalisation with the
      statistics of each episode's support or query set (β only, γ ≡ 1, ε = 1e-3) → ReLU],
      256 features; Glorot-uniform kernels, β = 0; support and query in two passes;
    * heads: W [B, 256, N] = 0, b = 0, then T steps w ← w − η ∇_w Σ_j CE_j on the support
      features, computed once per hyper-iteration; E: the mean query cross-entropy;
    * outer: Adam on the kernels, the offsets β and η, learning rate 1e-3 / (1 + 1e-5·iteration),
      ε added to √v before the bias correction (as Keras), then η ← max(η, 1e-6).

    Args:
        steps: T.
        kernels, offsets: initial weights in TF's layout (HWIO kernels), copied. Defaults to
            `None`: a fresh initialisation (seed SEED).
    """

    def __init__(self, steps: int, kernels: Optional[Sequence[np.ndarray]] = None,
                 offsets: Optional[Sequence[np.ndarray]] = None):
        torch = self.torch = import_torch()
        torch.manual_seed(SEED)
        if kernels is None:
            kernels = [torch.nn.init.xavier_uniform_(torch.empty(64, c, 3, 3))
                       for c in (1, 64, 64, 64)]
            offsets = [torch.zeros(64) for _ in kernels]
        else:
            kernels = [torch.from_numpy(k.transpose(3, 2, 0, 1).copy()) for k in kernels]  # → OIHW
            offsets = [torch.from_numpy(b.copy()) for b in offsets]
        self.kernels = [torch.nn.Parameter(k) for k in kernels]
        self.offsets = [torch.nn.Parameter(b) for b in offsets]
        self.eta = torch.nn.Parameter(torch.tensor(LEARNING_RATE))
        self.hypers = [*itertools.chain(*zip(self.kernels, self.offsets)), self.eta]  # TF's order
        self.optimizer = torch.optim.Adam(self.hypers, betas=(0.9, ADAM_BETA2))
        self.steps, self.iterations = steps, 0

    def features(self, images: Any) -> Any:
        """h_λ of each episode on its own: [B, n, 1, 28, 28] -> [B, n, 256] (channel-major, unlike
        TF's order: the heads start from zero, so the losses do not depend on it).

        The normalisation is ``F.instance_norm`` of [B, C, n, H, W]: the statistics of each
        episode and channel over its n images and pixels, in PyTorch's fused kernels (meta-steps
        about 20% faster than with the same normalisation written with ``var_mean``).
        """
        F = self.torch.nn.functional
        episodes, n = images.shape[:2]
        x = images.flatten(0, 1)
        for kernel, offset in zip(self.kernels, self.offsets):
            x = F.conv2d(F.pad(x, same_padding(x.shape[-1])), kernel, stride=2)
            x = x.unflatten(0, (episodes, n)).transpose(1, 2)  # [B, C, n, H, W]
            x = F.relu(F.instance_norm(x, bias=offset, eps=NORM_EPSILON))
            x = x.transpose(1, 2).flatten(0, 1)
        return x.reshape(episodes, n, -1)

    def query_loss(self, batch: Sequence[Any]) -> Any:
        """E: B heads fitted by T unrolled steps on the support features, their query CE."""
        torch, F = self.torch, self.torch.nn.functional
        support_x, support_y, query_x, query_y = batch
        support = self.features(support_x)
        episodes, n, dim = support.shape
        weights = torch.zeros(episodes, dim, WAYS, requires_grad=True)
        bias = torch.zeros(episodes, 1, WAYS, requires_grad=True)
        for _ in range(self.steps):
            logits = torch.baddbmm(bias, support, weights).flatten(0, 1)
            inner = F.cross_entropy(logits, support_y.flatten(), reduction="sum") / n  # Σ_j CE_j
            grad_w, grad_b = torch.autograd.grad(inner, (weights, bias), create_graph=True)
            weights, bias = weights - self.eta * grad_w, bias - self.eta * grad_b
        logits = torch.baddbmm(bias, self.features(query_x), weights).flatten(0, 1)
        return F.cross_entropy(logits, query_y.flatten())

    def hypergradients(self, batch: Sequence[Any]) -> tuple[Any, list[Any]]:
        """(E, ∇E) in the order of ``hypers``; no update."""
        loss = self.query_loss(batch)
        return loss, list(self.torch.autograd.grad(loss, self.hypers))

    def meta_step(self, batch: Sequence[Any]) -> float:
        """One hyper-iteration; returns E before the update."""
        self.optimizer.zero_grad()
        loss = self.query_loss(batch)
        loss.backward()
        self.iterations += 1
        group = self.optimizer.param_groups[0]  # Keras's schedule and ε: torch adds ε to √v̂
        group["lr"] = META_LR / (1 + META_LR_DECAY * (self.iterations - 1))
        group["eps"] = ADAM_EPSILON / math.sqrt(1 - ADAM_BETA2**self.iterations)
        self.optimizer.step()
        with self.torch.no_grad():
            self.eta.clamp_(min=MIN_LR)
        return loss.item()


def pre_drawn(meta_batch_size: int, count: int = PRE_DRAWN) -> list[Any]:
    """The step-only meta-batches of ``measure``: numbers 1 … count of the training stream."""
    import_tensorflow("cpu")
    iterator = iter(training_episodes(load_splits(), meta_batch_size, first_episode=meta_batch_size))
    return [next(iterator) for _ in range(count)]


def to_torch(torch: Any, batch: Any) -> tuple[Any, ...]:
    """A meta-batch of TF tensors as torch tensors: images NHWC → NCHW, labels int64."""
    images = lambda x: torch.from_numpy(x.numpy()).permute(0, 1, 4, 2, 3).contiguous()  # noqa: E731
    labels = lambda y: torch.from_numpy(y.numpy()).long()  # noqa: E731
    return images(batch[0]), labels(batch[1]), images(batch[2]), labels(batch[3])


@dataclasses.dataclass
class TorchMeasurement:
    """One (B, T) of the PyTorch subject (step-only)."""

    meta_batch_size: int  # B
    steps: int  # T
    step_rates: list[float]  # episodes/s of each chunk (all step-only)
    step_ms: list[float]  # every timed call
    step_cpu_ms: list[float]  # CPU ms of the process (all threads) per call, per chunk
    first_call_s: float
    setup_s: float  # imports, data loading, pre-drawing (TF), the learner
    baseline_mb: float
    memory_mb: float  # peak RSS above the baseline
    threads: int
    torch: str
    load_average: float

    @property
    def episodes_per_s(self) -> float:
        return statistics.median(self.step_rates)


def measure_torch(meta_batch_size: int, steps: int, timing: Timing) -> TorchMeasurement:
    """``TorchMetaLearner.meta_step`` on ``measure``'s pre-drawn meta-batches, timed as there."""
    start = time.perf_counter()
    learner = TorchMetaLearner(steps)
    batches = itertools.cycle([to_torch(learner.torch, b) for b in pre_drawn(meta_batch_size)])
    setup_s = time.perf_counter() - start
    baseline = max_rss_mb()

    def step() -> None:
        learner.meta_step(next(batches))

    first_call_s = first_call_and_warm_up(step, timing.warmup_seconds)
    rates, step_ms, cpu_ms = [], [], []
    for _ in range(timing.chunks):
        calls, seconds, cpu_seconds, ms = chunk(step, timing.chunk_seconds)
        rates.append(calls * meta_batch_size / seconds)
        step_ms.extend(ms)
        cpu_ms.append(1e3 * cpu_seconds / calls)
    return TorchMeasurement(meta_batch_size, steps, rates, step_ms, cpu_ms, first_call_s, setup_s,
                            baseline, max_rss_mb() - baseline, learner.torch.get_num_threads(),
                            learner.torch.__version__, os.getloadavg()[0])


@dataclasses.dataclass
class PairMeasurement:
    """One (B, T) of ``--side-by-side``: hyper_repr's and the PyTorch subject's steps alternating
    in one process on the same pre-drawn meta-batches."""

    meta_batch_size: int  # B
    steps: int  # T
    tf_ms: list[float]  # hyper_repr's train_on_batch, each pair's
    torch_ms: list[float]  # TorchMetaLearner.meta_step, adjacent to tf_ms
    network_ms: list[float]  # network_passes on the same meta-batch, after each pair
    load_average: float  # 1-min load average at the end

    @property
    def ratios(self) -> list[float]:
        """hyper_repr / PyTorch in episodes/s of each pair: PyTorch's time over hyper_repr's."""
        return [t / f for f, t in zip(self.tf_ms, self.torch_ms)]


# --side-by-side: at least PAIRS[0] pairs and PAIRS[1] seconds of them, at most PAIRS[2] pairs
SIDE_BY_SIDE_PAIRS, QUICK_SIDE_BY_SIDE_PAIRS = (20, 12.0, 60), (3, 1.0, 6)


def measure_pair(meta_batch_size: int, steps: int, timing: Timing, pairs: tuple) -> PairMeasurement:
    """Both learners built in this process and warmed up, then their steps alternate (which goes
    first alternates too) on the same meta-batches: the ratio of adjacent steps cancels the drifts
    of a shared machine, which move separate processes' rates by 10-20 %. Each library's threads
    idle while the other runs."""
    batches = pre_drawn(meta_batch_size)
    model, learner = build_model(steps, load_splits()), TorchMetaLearner(steps)
    torch_batches = [to_torch(learner.torch, b) for b in batches]
    passes = network_passes(model.network)
    steps_of = {"tf": lambda k: model.train_on_batch(batches[k % len(batches)]),
                "torch": lambda k: learner.meta_step(torch_batches[k % len(batches)]),
                "network": lambda k: passes(batches[k % len(batches)])}
    for step in steps_of.values():
        counter = itertools.count()
        first_call_and_warm_up(lambda step=step, counter=counter: step(next(counter)), timing.warmup_seconds)
    least, seconds, most = pairs
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    start = time.perf_counter()
    for k in range(most):  # pair k: meta-batch k for both, hyper_repr first when k is even
        if k >= least and time.perf_counter() - start >= seconds:
            break
        for name in ("tf", "torch", "network") if k % 2 == 0 else ("torch", "tf", "network"):
            times[name].append(1e3 * timed(functools.partial(steps_of[name], k)))
    return PairMeasurement(meta_batch_size, steps, times["tf"], times["torch"], times["network"],
                           os.getloadavg()[0])


def network_passes(network: Any) -> Callable[[Any], None]:
    """The part of a hyper_repr step no head, loss or update can remove: h_λ forward and backward
    on a meta-batch's support and query images, as the step runs them (``episode_features`` of
    each, the gradient of both with respect to the network's weights), with fixed cotangents.
    Its time bounds the step's from below."""
    import tensorflow as tf
    from hyper_repr.heads import episode_features

    @tf.function(autograph=False)
    def passes(support: Any, query: Any) -> Any:
        with tf.GradientTape() as tape:
            features = [episode_features(network, images) for images in (support, query)]
        grads = tape.gradient(features, network.trainable_variables,
                              output_gradients=[tf.ones_like(f) for f in features])
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    return lambda batch: passes(batch[0], batch[2]).numpy()


@dataclasses.dataclass
class TorchCheck:
    """hyper_repr and the PyTorch subject from the same weights on one meta-batch."""

    meta_batch_size: int
    steps: int
    loss: tuple[float, float]  # E: hyper_repr, PyTorch
    loss_error: float  # relative
    hypergradient_norm: tuple[float, float]  # ‖∇E‖ over every hyperparameter
    norm_error: float
    worst_error: float  # max over the hyperparameters of ‖∇_TF − ∇_PyTorch‖ / ‖∇_TF‖
    lr_hypergradient: tuple[float, float]  # ∂E/∂η
    update_error: float  # ‖Δλ_TF − Δλ_PyTorch‖ / ‖Δλ_TF‖ of the first meta_step (Adam)
    float64_worst_error: float  # worst_error of both learners run in float64 from the same weights

    @property
    def agree(self) -> bool:
        return self.loss_error <= CHECK_TOLERANCE and self.float64_worst_error <= FLOAT64_TOLERANCE


def check_torch(meta_batch_size: int, steps: int) -> TorchCheck:
    """E, ∇E and the first hyper-iteration of both learners on meta-batch 1 of the training stream,
    the TF network's initial weights copied into the PyTorch one; then E's hypergradient of both
    in float64 from the same weights, which tests that they compute the same function."""
    from hyper_repr import HyperRepresentation
    from hyper_repr.models import build_network

    batch = pre_drawn(meta_batch_size, count=1)[0]
    model = build_model(steps, load_splits())
    hypers = model.network.trainable_variables + [model.learning_rate]  # kernel, offset, …, η
    weights = [v.numpy() for v in model.network.trainable_variables]
    subject = TorchMetaLearner(steps, weights[0::2], weights[1::2])
    torch_batch = to_torch(subject.torch, batch)

    def tf_values(tensors: Sequence[Any]) -> list[np.ndarray]:
        return [np.float64(t.numpy()) for t in tensors]

    def torch_values(tensors: Sequence[Any]) -> list[np.ndarray]:  # in TF's layout
        arrays = [np.float64(t.detach().numpy()) for t in tensors]
        return [a.transpose(2, 3, 1, 0) if a.ndim == 4 else a for a in arrays]

    def error(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
        flat = lambda arrays: np.concatenate([x.ravel() for x in arrays])  # noqa: E731
        return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a)))

    loss, grads, _ = model.hypergradients(batch)
    by_variable = {id(v): g for v, g in zip(model.trainable_variables, grads)}
    torch_loss, torch_grads = subject.hypergradients(torch_batch)
    grads, torch_grads = tf_values([by_variable[id(v)] for v in hypers]), torch_values(torch_grads)
    assert [g.shape for g in grads] == [g.shape for g in torch_grads], "hyperparameter order"
    before, torch_before = tf_values(hypers), torch_values(subject.hypers)
    model.train_on_batch(batch)
    subject.meta_step(torch_batch)
    update = [a - b for a, b in zip(tf_values(hypers), before)]
    torch_update = [a - b for a, b in zip(torch_values(subject.hypers), torch_before)]
    losses = (float(loss), torch_loss.item())
    norms = tuple(float(np.sqrt(sum(np.sum(g**2) for g in gs))) for gs in (grads, torch_grads))
    worst = max(error([a], [b]) for a, b in zip(grads, torch_grads))

    network = build_network("omniglot", dtype="float64")  # the same function in float64
    for variable, value in zip(network.trainable_variables, weights):
        variable.assign(value.astype(np.float64))
    model64 = HyperRepresentation(network, ways=WAYS, steps=steps, learning_rate=LEARNING_RATE, learn_lr=LEARN_LR)
    _, grads64, _ = model64.hypergradients(batch)  # the images are cast to the network's float64
    by_variable = {id(v): g for v, g in zip(model64.trainable_variables, grads64)}
    torch = subject.torch
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # η and the heads of the subject below
    try:
        subject64 = TorchMetaLearner(steps, [w.astype(np.float64) for w in weights[0::2]],
                                     [w.astype(np.float64) for w in weights[1::2]])
        _, torch_grads64 = subject64.hypergradients(tuple(x.double() if x.is_floating_point() else x
                                                          for x in torch_batch))
    finally:
        torch.set_default_dtype(default_dtype)
    float64_worst = max(error([a], [b]) for a, b in zip(
        tf_values([by_variable[id(v)] for v in network.trainable_variables + [model64.learning_rate]]),
        torch_values(torch_grads64)))
    return TorchCheck(meta_batch_size, steps, losses, abs(losses[1] / losses[0] - 1), norms,
                      abs(norms[1] / norms[0] - 1), worst,
                      (float(grads[-1]), float(torch_grads[-1])), error(update, torch_update), float64_worst)


# -- worker 4: the launchers' training run, timed by a Keras callback -----------------------------------

@dataclasses.dataclass
class LoopMeasurement:
    settings: dict  # LoopSettings
    durations: dict  # component -> seconds of each occurrence, in order (see `LoopTimer`)
    cpu: dict  # component -> CPU seconds of the process (all threads) of each occurrence
    setup_s: float  # meta_train's start up to fit's first callback: model, restore, pipelines
    loop_s: float  # fit, from on_train_begin to on_train_end
    loop_cpu_s: float  # CPU seconds of the process in it
    meta_test_s: float  # the meta-test after training (not part of the rate)
    total_s: float  # the whole meta_train call
    elapsed_s: float  # meta_train's own elapsed training time (its results.json)
    logged: list  # the rows of metrics.csv (epoch, iteration, elapsed_seconds, …)
    checkpoint_mb: float  # size of the checkpoint folder at the end
    baseline_mb: float
    loop_memory_mb: float  # peak RSS above the baseline at the end of fit (before the meta-test)
    memory_mb: float  # peak RSS above the baseline at the end (meta-test included)
    load_average: float
    outside_ms: list[float]  # the same model's train_on_batch(next batch) after meta_train, per call
    outside_cpu_ms: float  # CPU ms per call of those


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process)."""
    return time.perf_counter(), time.process_time()


def loop_timer() -> Any:
    """A Keras callback, first in ``fit``'s list, timing (wall and CPU) each ``step`` (batch begin
    to end: the train function, the next meta-batch included, read in the graph), what runs
    ``between`` two steps (the other callbacks' batch-end work: time-based checkpoints; Keras's
    loop), each ``validation``, and each ``epoch_end`` (from this callback's on_epoch_end to the
    next epoch: metrics.csv, TensorBoard, best.keras, the epoch's checkpoint)."""
    import keras

    class LoopTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.durations = {k: [] for k in ("step", "between", "validation", "epoch_end")}
            self.cpu = {k: [] for k in self.durations}
            self.marks: dict[str, tuple[float, float]] = {}
            self.peak_mb = 0.0

        def _end(self, name: str, since: str) -> None:
            if since in self.marks:
                (wall, cpu), (wall0, cpu0) = clock(), self.marks.pop(since)
                self.durations[name].append(wall - wall0)
                self.cpu[name].append(cpu - cpu0)

        def on_train_begin(self, logs: Optional[dict] = None) -> None:
            self.marks["train"] = clock()

        def on_train_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
            self._end("between", "batch_end")
            self._end("epoch_end", "epoch_end")
            self.marks["batch"] = clock()

        def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
            self._end("step", "batch")
            self.marks["batch_end"] = clock()

        def on_test_begin(self, logs: Optional[dict] = None) -> None:
            self.marks.pop("batch_end", None)
            self.marks["validation"] = clock()

        def on_test_end(self, logs: Optional[dict] = None) -> None:
            self._end("validation", "validation")

        def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
            self.marks["epoch_end"] = clock()

        def on_train_end(self, logs: Optional[dict] = None) -> None:
            self._end("epoch_end", "epoch_end")
            self.marks["train_end"] = clock()
            self.peak_mb = max_rss_mb()

    return LoopTimer()


def measure_loop(settings: LoopSettings) -> LoopMeasurement:
    """``train.meta_train`` (the launchers' run: Keras fit with its callbacks) with ``loop_timer``
    among its callbacks, then, in the same process, the same model's step outside fit."""
    import_tensorflow("cpu")
    from hyper_repr import train

    splits = load_splits()
    config = train.Config(steps=settings.steps, learning_rate=LEARNING_RATE, learn_lr=LEARN_LR,
                          meta_batch_size=settings.meta_batch_size, iterations=settings.iterations,
                          eval_every=settings.eval_every, eval_episodes=settings.eval_episodes,
                          test_episodes=settings.test_episodes, test_shots=(SHOTS,), seed=SEED)
    timer = loop_timer()
    with tempfile.TemporaryDirectory(prefix="meta_training_") as workdir:
        baseline = max_rss_mb()
        start = clock()
        results = train.meta_train(config, workdir, splits, verbose=0, extra_callbacks=[timer])
        end = clock()
        logged = train.read_metrics(workdir)
        checkpoint_mb = sum(f.stat().st_size for f in (Path(workdir) / "checkpoints").iterdir()) / 2**20
    memory_mb = max_rss_mb() - baseline
    # The same model's step outside fit, fed by a fresh stream of the same pipeline.
    batches = iter(training_episodes(splits, settings.meta_batch_size, first_episode=RESUME_EPISODE))
    timer.model.train_on_batch(next(batches))
    calls = max(MIN_CHUNK_CALLS, settings.iterations // 5)
    outside_cpu = time.process_time()
    outside = [1e3 * timed(lambda: timer.model.train_on_batch(next(batches))) for _ in range(calls)]
    outside_cpu_ms = 1e3 * (time.process_time() - outside_cpu) / calls
    (train_start, train_start_cpu), (train_end, train_end_cpu) = timer.marks["train"], timer.marks["train_end"]
    return LoopMeasurement(dataclasses.asdict(settings), timer.durations, timer.cpu, train_start - start[0],
                           train_end - train_start, train_end_cpu - train_start_cpu, end[0] - train_end,
                           end[0] - start[0], results["elapsed_seconds"], logged, checkpoint_mb, baseline,
                           timer.peak_mb - baseline, memory_mb, os.getloadavg()[0], outside, outside_cpu_ms)


# -- worker 5: the step under a MirroredStrategy of R replicas ------------------------------------------

DEFAULT_REPLICAS, STRATEGY_BATCH_SIZE = (1, 2, 4), 8  # --strategy mirrored: R, and B (a multiple of every R)
REPLICA_MODES = ("step", "compute", "all_reduce")


@dataclasses.dataclass
class ReplicaMeasurement:
    """One (device, R, B, T) under ``--strategy``: fit's hyper-iteration and its parts."""

    device: str  # "cpu" (R logical devices of the CPU) or "gpu" (R GPUs)
    strategy: str  # "none" (no strategy: one device) or "mirrored"
    replicas: int  # R
    meta_batch_size: int  # B, the global meta-batch (B/R episodes per replica)
    steps: int  # T
    ms: dict  # mode -> ms of every timed call, over the chunks (REPLICA_MODES)
    first_call_s: float  # tracing + one hyper-iteration
    gpus_visible: int
    tensorflow: str
    load_average: float

    @property
    def medians(self) -> tuple[float, float, float]:
        """Median ms of a step, of the compute alone and of the all-reduce alone."""
        return tuple(statistics.median(self.ms[mode]) for mode in REPLICA_MODES)


def distributed_measure(device: str, strategy_name: str, replicas: int, meta_batch_size: int, steps: int,
                        timing: Timing) -> ReplicaMeasurement:
    """In this fresh process, under ``strategy_name`` ("none", or "mirrored" over R logical CPU
    devices or R GPUs), alternating chunks of three calls on pre-drawn meta-batches of B episodes:

    * step: one hyper-iteration as ``fit`` runs it (Keras's train function on the distributed
      dataset: each replica's B/R episodes, the all-reduce of the hypergradients, the update);
    * compute: each replica's ``hypergradients`` on its episodes, no cross-replica reduction and
      no update (``strategy.run`` on the same distributed dataset);
    * all_reduce: the all-reduce alone of tensors shaped like the hypergradients and the three
      scalars of ``far.distribute.share`` (what a hyper-iteration reduces across replicas).
    """
    tf, gpus = import_tensorflow(device)
    if device == "cpu" and replicas > 1:  # before TensorFlow initialises its devices
        tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                                   [tf.config.LogicalDeviceConfiguration()] * replicas)
    if strategy_name == "none":
        strategy = tf.distribute.get_strategy()
    else:
        devices = tf.config.list_logical_devices("CPU" if device == "cpu" else "GPU")[:replicas]
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    splits = load_splits()
    iterator = iter(training_episodes(splits, meta_batch_size, first_episode=meta_batch_size))
    drawn = [next(iterator) for _ in range(PRE_DRAWN)]
    episodes = tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda *x: tf.concat(x, 0), *drawn))
    meta_batches = strategy.experimental_distribute_dataset(
        episodes.batch(meta_batch_size, drop_remainder=True).repeat())  # the pre-drawn ones, cycled
    with strategy.scope():
        model = build_model(steps, splits)
    batches = iter(meta_batches)
    model.make_train_function()  # Keras 3 keeps it in model.train_function
    train_function = model.train_function
    shaped = [tf.ones(v.shape, v.dtype) for v in model.trainable_variables] + [tf.ones([], tf.float32)] * 3

    def total(tensors: Sequence[Any]) -> Any:  # one number that needs every tensor (nothing pruned)
        return tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32)) for t in tensors])

    @tf.function
    def compute(iterator: Any) -> Any:
        return strategy.run(lambda batch: total(model.hypergradients(batch)[1]), args=(next(iterator),))

    @tf.function
    def all_reduce() -> Any:
        return strategy.run(lambda: total(tf.distribute.get_replica_context().all_reduce("SUM", shaped)))

    calls = {"step": lambda: train_function(batches)["loss"], "compute": lambda: compute(batches),
             "all_reduce": all_reduce}
    run = {mode: (lambda call=call: [x.numpy() for x in strategy.experimental_local_results(call())])
           for mode, call in calls.items()}  # each call waits for its result
    first_call_s = first_call_and_warm_up(run["step"], timing.warmup_seconds)
    for mode in REPLICA_MODES[1:]:
        first_call_and_warm_up(run[mode], timing.warmup_seconds / 2)
    ms: dict = {mode: [] for mode in REPLICA_MODES}
    for _ in range(timing.chunks):  # side by side: the load hits every mode alike
        for mode in REPLICA_MODES:
            ms[mode].extend(chunk(run[mode], timing.chunk_seconds / len(REPLICA_MODES))[3])
    return ReplicaMeasurement(device, strategy_name, strategy.num_replicas_in_sync, meta_batch_size, steps, ms,
                              first_call_s, gpus, tf.__version__, os.getloadavg()[0])


def replica_report(measurements: Sequence[ReplicaMeasurement], info: dict, timing: Timing) -> list[str]:
    """The table of ``--strategy``: episodes/s per replica count and the all-reduce's share."""
    rows = []
    for m in measurements:
        step, compute, reduce = m.medians
        rows.append([m.device, m.strategy, str(m.replicas), str(m.meta_batch_size), str(m.steps),
                     f"{1e3 * m.meta_batch_size / step:.1f}", f"{1e3 * m.meta_batch_size / step / m.replicas:.1f}",
                     f"{step:.1f}", f"{compute:.1f}", f"{step - compute:.1f}", f"{reduce:.2f}",
                     f"{100 * reduce / step:.1f}%", f"{m.first_call_s:.1f}", f"{m.load_average:.1f}"])
    return [
        "Meta-training under tf.distribute: hyper_repr.HyperRepresentation, Omniglot 5-way 1-shot, float32,",
        f"  learned η; TF {info['tensorflow']}, {info['cpu_count']} CPUs ({info['cpu']}); one fresh process per row;",
        f"  medians of every call over {timing.chunks} rounds of the three modes side by side (≥ "
        f"{timing.chunk_seconds / len(REPLICA_MODES):.2f} s each), after the first call and warm-up.",
        "",
        table(["device", "strategy", "R", "B", "T", "episodes/s", "per replica", "ms/step", "compute ms",
               "rest ms", "all-reduce ms", "all-reduce share", "first call s", "load"], rows, left=2),
        "  ms/step: fit's hyper-iteration (each replica's B/R episodes, the all-reduce, the update); compute: the",
        "  replicas' hypergradients alone (no cross-replica reduction, no update); rest = ms/step − compute: the",
        "  reduction, the update and the step's bookkeeping; all-reduce: the all-reduce alone of tensors shaped like",
        "  the hypergradients (and far.distribute's three scalars); its share: of ms/step. cpu rows: R logical",
        "  devices of the same CPU cores (they share them: no speed-up is expected here, the rows measure the",
        "  strategy's overhead); gpu rows: R GPUs.",
    ]


# -- the driver ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    """One (device, B, T)."""

    device: str
    meta_batch_size: int
    steps: int
    step_episodes_per_s: float  # median over chunks
    fit_episodes_per_s: float  # median over chunks
    fit_cost: float  # 1 − fit / step-only rate
    step_spread: float  # (max − min) / median of the step-only chunk rates
    ms_per_step: float  # median step-only call
    cpu_ms_per_step: float  # CPU ms (all threads) per step-only call, median over chunks
    fit_cpu_ms_per_step: float  # the same in fit (the pipeline's threads included)
    ms_per_episode: float
    pipeline_alone_ms: float  # next(iterator) alone, per meta-batch
    first_call_s: float
    peak_mb: float  # peak RSS above the baseline
    gpu_peak_mb: Optional[float]
    baseline_mb: float
    first_batch_s: float
    resumed_first_batch_s: float
    load_average: float
    gflops: float  # the counted arithmetic per step over the median step time
    peak_fraction: float  # gflops / the machine's measured peak
    profile: Optional[dict]


def summarize(m: Measurement) -> Summary:
    step, pipe = statistics.median(m.step_rates), statistics.median(m.fit_rates)
    ms = statistics.median(m.step_ms)
    return Summary(m.device, m.meta_batch_size, m.steps, step, pipe, 1 - pipe / step,
                   (max(m.step_rates) - min(m.step_rates)) / step, ms, statistics.median(m.step_cpu_ms),
                   statistics.median(m.fit_cpu_ms), ms / m.meta_batch_size, m.pipeline_alone_ms,
                   m.first_call_s, m.memory_mb, m.gpu_peak_mb, m.baseline_mb, m.first_batch_s,
                   m.resumed_first_batch_s, m.load_average, m.flops_per_step / ms / 1e6,
                   m.flops_per_step / ms / 1e6 / m.peak_gflops if m.peak_gflops else 0.0, m.profile)


def pytorch_rate(s: Summary, pytorch: Sequence[TorchMeasurement]) -> Optional[float]:
    """The PyTorch subject's episodes/s at a CPU row's (B, T), if measured."""
    return next((t.episodes_per_s for t in pytorch if s.device == "cpu"
                 and (t.meta_batch_size, t.steps) == (s.meta_batch_size, s.steps)), None)


def speed_report(summaries: Sequence[Summary], pytorch: Sequence[TorchMeasurement], info: dict,
                 args: argparse.Namespace) -> list[str]:
    rows = []
    for s in summaries:
        rate = pytorch_rate(s, pytorch)
        rows.append([s.device, str(s.meta_batch_size), str(s.steps), f"{s.step_episodes_per_s:.1f}",
                     f"{s.fit_episodes_per_s:.1f}", f"{100 * s.fit_cost:+.0f}%", f"{s.ms_per_step:.1f}",
                     f"{s.cpu_ms_per_step:.0f} / {s.fit_cpu_ms_per_step:.0f}",
                     f"{s.ms_per_episode:.1f}", f"{s.pipeline_alone_ms:.2f}", f"{s.first_call_s:.1f}",
                     f"{s.peak_mb:.0f}", fmt(s.gpu_peak_mb, ".0f"), fmt(rate, ".1f"),
                     fmt(rate and s.step_episodes_per_s / rate, ".2f"),
                     fmt(rate and s.fit_episodes_per_s / rate, ".2f"),
                     f"{s.gflops:.0f}", f"{100 * s.peak_fraction:.0f}%", f"{s.load_average:.1f}"])
    resumed = max(s.resumed_first_batch_s for s in summaries)
    started = max(s.first_batch_s for s in summaries)
    lines = [
        "Meta-training speed of hyper_repr.HyperRepresentation, Omniglot 5-way 1-shot (15 queries per class),",
        f"  float32, learned η (initial {LEARNING_RATE}); TF {info['tensorflow']}, Keras {info['keras']}, Python "
        f"{info['python']}; {info['cpu_count']} CPUs ({info['cpu']});",
        f"  1-min load average {info['load_average'][0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end. Rates: "
        f"median over {args.timing.chunks} chunks of ≥ {args.timing.chunk_seconds:g} s per mode (alternating),",
        f"  after the first call and {args.timing.warmup_seconds:g} s of warm-up; one fresh process per row.",
        "",
        table(["device", "B", "T", "episodes/s", "fit", "fit cost", "ms/step", "CPU ms/step", "ms/episode",
               "pipe ms/batch", "first call s", "peak MB", "GPU MB", "PyTorch", "ratio", "ratio fit", "GFLOP/s", "of peak", "load"],
              rows),
        "  episodes/s: the training step alone (train_on_batch) on pre-drawn meta-batches; fit: Keras fit on the",
        "  live episode_dataset (its epochs alternate with the step-only chunks); fit cost: 1 − fit/(episodes/s);",
        "  CPU ms/step: CPU time of the process (all threads) per step, step-only / fit (less sensitive to",
        "  other processes than wall time; with 2 busy threads up to",
        "  2 × ms/step); pipe ms/batch: next(iterator) alone; first call: tracing + one step; peak MB: peak RSS",
        "  above the process's baseline after imports and data; GPU MB: TF's peak device memory; load: the",
        "  1-min load average (2 CPUs).",
        "  PyTorch: episodes/s of the PyTorch subject in this run (the same model, maths and",
        "  pre-drawn meta-batches; table below); ratio = hyper_repr / PyTorch, step-only and fit",
        "  (> 1: hyper_repr is faster).",
        f"  The first meta-batch of a stream takes ≤ {started:.3f} s from episode 0 and ≤ {resumed:.3f} s from "
        f"episode {RESUME_EPISODE:,} (resuming skips nothing).",
        "  GFLOP/s: the step's convolutions and matrix products, counted (step_flops), over its median time; of",
        f"  peak: that over one {harness.PEAK_SIZE}³ float32 matrix product in the same process "
        f"({min(s.gflops / s.peak_fraction for s in summaries if s.peak_fraction):.0f}-"
        f"{max(s.gflops / s.peak_fraction for s in summaries if s.peak_fraction):.0f} GFLOP/s).",
        "",
        f"Where a step's time goes (TensorFlow's profiler, {PROFILE_CALLS} step-only calls per row; op time adds",
        "over the 2 threads, so it can exceed the wall time; first call = tracing + one step):",
    ]
    for s in summaries:
        if s.profile:
            where = harness.Profile(**s.profile)
            lines.append(f"  B={s.meta_batch_size:<3d} T={s.steps:<3d} first call {s.first_call_s:.1f} s; {where.describe()}")
    return lines


def pytorch_report(pytorch: Sequence[TorchMeasurement], check: Optional[TorchCheck]) -> list[str]:
    """The PyTorch subject's table and its check, or a note when PyTorch is not installed."""
    if check is None:
        return ["", "PyTorch is not installed (see the docstring): no PyTorch subject."]
    median = statistics.median
    rows = [[str(t.meta_batch_size), str(t.steps), f"{t.episodes_per_s:.1f}",
             f"{median(t.step_ms):.1f}", f"{median(t.step_cpu_ms):.0f}",
             f"{median(t.step_ms) / t.meta_batch_size:.1f}", f"{t.first_call_s:.2f}",
             f"{t.memory_mb:.0f}", f"{t.load_average:.1f}"] for t in pytorch]
    c, (loss, torch_loss), (norm, torch_norm) = check, check.loss, check.hypergradient_norm
    verdict = "the same function" if c.agree else "DIFFERENT functions"
    return ["", f"PyTorch subject: TorchMetaLearner.meta_step (torch {pytorch[0].torch}, "
            f"{pytorch[0].threads} threads, float32)",
            "  on the TF rows' pre-drawn meta-batches, one fresh process per row, right after its",
            "  TF row; the same timing, every chunk step-only.",
            "", table(["B", "T", "episodes/s", "ms/step", "CPU ms/step", "ms/episode",
                       "first call s", "peak MB", "load"], rows),
            "  peak MB: above the baseline after imports (TF's too: it draws the episodes), data",
            "  and the learner.",
            f"Check (B = {c.meta_batch_size}, T = {c.steps}, meta-batch 1 of the stream, the TF "
            "network's initial weights copied): hyper_repr / PyTorch",
            f"  E {loss:.6f} / {torch_loss:.6f} (relative difference {c.loss_error:.1e}), "
            f"‖∇E‖ {norm:.6f} / {torch_norm:.6f} ({c.norm_error:.1e}),",
            f"  worst hyperparameter ‖∇_TF − ∇_PyTorch‖/‖∇_TF‖ {c.worst_error:.1e}, ∂E/∂η "
            f"{c.lr_hypergradient[0]:.6f} / {c.lr_hypergradient[1]:.6f},",
            f"  first Adam update ‖Δλ_TF − Δλ_PyTorch‖/‖Δλ_TF‖ {c.update_error:.1e}; both in float64, worst "
            f"hyperparameter {c.float64_worst_error:.1e}:",
            f"  {verdict} (tolerances {CHECK_TOLERANCE:.0e} on E in float32, {FLOAT64_TOLERANCE:.0e} on every "
            "hyperparameter's ∇E in float64)."]


def loop_breakdown(m: LoopMeasurement) -> dict:
    """The loop's time split into its components (wall and CPU seconds), and the rates derived."""
    d, c, s = m.durations, m.cpu, m.settings
    B, iterations, median = s["meta_batch_size"], s["iterations"], statistics.median
    rest = lambda values: values[1:] or values  # noqa: E731  (after the first, tracing one)
    other = m.loop_s - sum(sum(v) for v in d.values())
    other_cpu = m.loop_cpu_s - sum(sum(v) for v in c.values())
    step_ms, step_cpu_ms = 1e3 * median(rest(d["step"])), 1e3 * median(rest(c["step"]))
    per_iteration = (sum(rest(d["step"])) + sum(d["between"]) + other) / iterations
    per_epoch = median(rest(d["validation"])) + median(d["epoch_end"])
    fixed = d["step"][0] - step_ms / 1e3 + d["validation"][0] - median(rest(d["validation"]))
    # the iterations N of a LONG_RUN_SECONDS run: fixed + N·per_iteration + (N / eval_every)·per_epoch = time
    long_run = (LONG_RUN_SECONDS - fixed) / (per_iteration + per_epoch / s["eval_every"])
    steady = iterations * step_ms / 1e3  # fit at the median step time
    excess = {  # fit's time beyond `steady`, by cause (they add up to loop_s − steady)
        "tracing": d["step"][0] - step_ms / 1e3,
        "validation": sum(d["validation"]),
        "epoch_ends": sum(d["epoch_end"]),
        "between_steps": sum(d["between"]) + other,
        "step_time_spread": sum(rest(d["step"])) - (iterations - 1) * step_ms / 1e3,
    }
    return {
        "episodes": B * iterations,
        "loop_episodes_per_s": B * iterations / m.loop_s,
        "elapsed_episodes_per_s": B * iterations / m.elapsed_s,
        "logged_episodes_per_s": [B * row["iteration"] / row["elapsed_seconds"] for row in m.logged],
        "steady_episodes_per_s": 1e3 * B / step_ms,
        "outside_ms": median(m.outside_ms),
        "outside_episodes_per_s": 1e3 * B / median(m.outside_ms),
        "components": {  # name -> (wall s, CPU s, occurrences)
            "step_first": (d["step"][0], c["step"][0], 1),
            "step_rest": (sum(rest(d["step"])), sum(rest(c["step"])), len(d["step"]) - 1),
            "between": (sum(d["between"]), sum(c["between"]), len(d["between"])),
            "validation": (sum(d["validation"]), sum(c["validation"]), len(d["validation"])),
            "epoch_end": (sum(d["epoch_end"]), sum(c["epoch_end"]), len(d["epoch_end"])),
            "other": (other, other_cpu, 1),
        },
        "step_ms": step_ms,
        "step_cpu_ms": step_cpu_ms,
        "between_ms": 1e3 * median(d["between"]) if d["between"] else 0.0,
        "validation_s": d["validation"],
        "epoch_end_s": d["epoch_end"],
        "loop_cpu_ms_per_iteration": 1e3 * m.loop_cpu_s / iterations,
        "loop_cpu_overhead": m.loop_cpu_s / (iterations * step_cpu_ms / 1e3) - 1,
        "long_run_episodes_per_s": B * long_run / LONG_RUN_SECONDS,
        "long_run_fixed_s": fixed,
        "steady_s": steady,
        "excess_s": excess,
    }


def loop_report(m: LoopMeasurement, b: dict, summaries: Sequence[Summary],
                pytorch: Sequence[TorchMeasurement]) -> list[str]:
    s, parts = m.settings, b["components"]
    raw = next((x for x in summaries if x.device == "cpu" and x.meta_batch_size == s["meta_batch_size"]
                and x.steps == s["steps"]), None)
    reference = raw and pytorch_rate(raw, pytorch)

    def row(label: str, name: str, per_call: str) -> list[str]:
        wall, cpu, calls = parts[name]
        return [label, f"{wall:.2f}", fmt(cpu, ".2f"), f"{100 * wall / m.loop_s:.1f}%", str(calls), per_call]

    rows = [row("step, first (tracing)", "step_first", f"{parts['step_first'][0]:.2f} s"),
            row("steps (train function, next meta-batch in it)", "step_rest",
                f"{b['step_ms']:.1f} ms, CPU {b['step_cpu_ms']:.0f} ms (medians)"),
            row("between steps (callbacks: time-based checkpoints)", "between", f"{b['between_ms']:.2f} ms (median)"),
            row("validation (evaluate)", "validation", " / ".join(f"{x:.2f}" for x in b["validation_s"]) + " s"),
            row("epoch end (csv, TensorBoard, best.keras, checkpoint)", "epoch_end",
                " / ".join(f"{x:.3f}" for x in b["epoch_end_s"]) + " s"),
            row("rest (fit's start and end)", "other", "-"),
            ["fit", f"{m.loop_s:.2f}", f"{m.loop_cpu_s:.2f}", "100%", "", ""]]
    rates = [("fit overall", b["loop_episodes_per_s"]),
             ("meta_train's own elapsed time", b["elapsed_episodes_per_s"]),
             *((f"metrics.csv at iteration {r['iteration']:.0f}", v)
               for r, v in zip(m.logged, b["logged_episodes_per_s"])),
             ("in fit: steps alone (median)", b["steady_episodes_per_s"]),
             ("same process after meta_train: train_on_batch(next batch), median", b["outside_episodes_per_s"]),
             (f"projected: a {LONG_RUN_SECONDS:g}-s run with these components", b["long_run_episodes_per_s"])]
    if raw is not None:
        rates += [("benchmark above: step-only (train_on_batch)", raw.step_episodes_per_s),
                  ("benchmark above: fit on the live pipeline", raw.fit_episodes_per_s)]
    return ["", f"Training run: hyper_repr.train.meta_train (Keras fit and the launchers' callbacks), "
            f"B = {s['meta_batch_size']}, T = {s['steps']}, {s['iterations']} iterations, validation every "
            f"{s['eval_every']} on {s['eval_episodes']} episodes",
            table(["component", "s", "CPU s", "of fit", "times", "each"], rows),
            f"  CPU s: CPU time of the process (all threads). fit costs {b['loop_cpu_ms_per_iteration']:.0f} CPU ms "
            f"per iteration, {100 * b['loop_cpu_overhead']:+.0f}% over its median step (tracing and validation "
            f"included); outside fit the same step costs {m.outside_cpu_ms:.0f} CPU ms.",
            f"  fit took {m.loop_s - b['steady_s']:.1f} s more than {s['iterations']} × its median step: "
            + ", ".join(f"{name.replace('_', ' ')} {v:.1f} s ({100 * v / m.loop_s:.1f}%)"
                        for name, v in b["excess_s"].items()) + ".",
            f"  Set-up before fit {m.setup_s:.2f} s; meta-test after it {m.meta_test_s:.2f} s (3 × "
            f"{s['test_episodes']} episodes; neither is in the rates); checkpoints {m.checkpoint_mb:.1f} MB;",
            f"  peak RSS above the process's baseline: +{m.loop_memory_mb:.0f} MB in fit, +{m.memory_mb:.0f} MB "
            f"with the meta-test; load {m.load_average:.1f}.",
            "", table(["episodes/s", "", f"vs PyTorch {fmt(reference, '.1f')}"],
                      [[name, f"{v:.1f}", fmt(reference and v / reference, ".2f")] for name, v in rates]),
            f"  projected: {b['long_run_fixed_s']:.1f} s of one-off tracing (first step and validation, beyond "
            f"a steady one), then per iteration a step and what runs between steps, and every "
            f"{s['eval_every']} iterations one validation and one epoch end."]


def write_results(prefix: Path, summaries: Sequence[Summary], measurements: Sequence[Measurement],
                  pytorch: Sequence[TorchMeasurement], check: Optional[TorchCheck],
                  loop: Optional[LoopMeasurement], breakdown: Optional[dict], meta: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        fields = [field.name for field in dataclasses.fields(Summary)]
        writer = csv.DictWriter(f, fieldnames=fields + ["pytorch_episodes_per_s", "ratio_step",
                                                        "ratio_fit"])
        writer.writeheader()
        for s in summaries:
            rate = pytorch_rate(s, pytorch)
            writer.writerow({**dataclasses.asdict(s), "pytorch_episodes_per_s": rate,
                             "ratio_step": rate and s.step_episodes_per_s / rate,
                             "ratio_fit": rate and s.fit_episodes_per_s / rate})
    with open(prefix.with_suffix(".json"), "w") as f:
        json.dump({**meta, "summary": [dataclasses.asdict(s) for s in summaries],
                   "measurements": [dataclasses.asdict(m) for m in measurements],
                   "pytorch": {
                       "check": check and {**dataclasses.asdict(check), "agree": check.agree},
                       "measurements": [{**dataclasses.asdict(t),
                                         "episodes_per_s": t.episodes_per_s} for t in pytorch]},
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
    parser.add_argument("--strategy", choices=("none", "mirrored"), default="none",
                        help="mirrored: instead of the tables above, episodes/s per replica count R under "
                             "tf.distribute.MirroredStrategy (R logical CPU devices, and 1 … n GPUs where "
                             "visible; B = --meta-batch-sizes, default 8) with the all-reduce's share of the step")
    parser.add_argument("--replicas", type=int, nargs="+",
                        help=f"the replica counts R of --strategy mirrored (default {DEFAULT_REPLICAS})")
    parser.add_argument("--side-by-side", action="store_true",
                        help="instead of the tables above: hyper_repr's and the PyTorch subject's steps alternating "
                             "in one process per (B, T), the median ratio of adjacent steps (and the check)")
    parser.add_argument("--worker", choices=("cpu", "gpu", "torch", "check", "pair"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--replica-worker", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--loop-worker", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replicas and args.strategy == "none":
        parser.error("--replicas goes with --strategy mirrored")
    if args.side_by_side and args.strategy != "none":
        parser.error("--side-by-side goes without --strategy")
    args.replicas = sorted(set(args.replicas or DEFAULT_REPLICAS))
    if args.strategy == "mirrored":
        args.meta_batch_sizes = args.meta_batch_sizes or [STRATEGY_BATCH_SIZE]
        args.steps = args.steps or [5]
        indivisible = [(B, R) for B in args.meta_batch_sizes for R in args.replicas if B % R]
        if indivisible or min(args.replicas) < 1:
            parser.error(f"--meta-batch-sizes must be multiples of every --replicas (positive); got B, R = "
                         f"{indivisible[0] if indivisible else args.replicas}")
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
    if args.worker:  # internal: one (device, B, T) in this fresh process, or the PyTorch check
        B, T = args.meta_batch_sizes[0], args.steps[0]
        if args.worker == "check":
            result = check_torch(B, T)
        elif args.worker == "torch":
            result = measure_torch(B, T, args.timing)
        elif args.worker == "pair":
            result = measure_pair(B, T, args.timing, QUICK_SIDE_BY_SIDE_PAIRS if args.quick else SIDE_BY_SIDE_PAIRS)
        else:
            result = measure(args.worker, B, T, args.timing)
        print(json.dumps(dataclasses.asdict(result)))
        return
    if args.loop_worker is not None:  # internal: the instrumented meta_train run
        print(json.dumps(dataclasses.asdict(measure_loop(LoopSettings(**args.loop_worker)))))
        return
    if args.replica_worker is not None:  # internal: one (device, strategy, R, B, T)
        print(json.dumps(dataclasses.asdict(distributed_measure(**args.replica_worker, timing=args.timing))))
        return
    if args.strategy == "mirrored":
        strategy_main(args)
        return
    if args.side_by_side:
        side_by_side_main(args)
        return
    info = harness.machine_info()
    worker = functools.partial(harness.run_worker, "meta_training")
    quick = ["--quick"] if args.quick else []
    configs = [(B, T) for B in args.meta_batch_sizes for T in args.steps]
    measurements: list[Measurement] = []
    pytorch: list[TorchMeasurement] = []
    start = time.perf_counter()
    check = None
    if importlib.util.find_spec("torch") is None:
        print("PyTorch is not installed (see the docstring): skipping the PyTorch subject.",
              file=sys.stderr, flush=True)
    else:
        B, T = args.meta_batch_sizes[0], max(args.steps)
        check = TorchCheck(**worker(["--worker", "check", "--meta-batch-sizes", str(B), "--steps", str(T)], "check"))
        print(f"[check] B={B} T={T}: relative differences E {check.loss_error:.1e}, ‖∇E‖ "
              f"{check.norm_error:.1e}, float64 ∇E {check.float64_worst_error:.1e}  "
              f"({time.perf_counter() - start:4.0f} s)",
              file=sys.stderr, flush=True)
    devices = ["cpu"]
    for device in devices:  # "gpu" is appended when a CPU worker saw one
        for i, (B, T) in enumerate(configs, 1):
            m = Measurement(**worker(["--worker", device, "--meta-batch-sizes", str(B), "--steps", str(T), *quick],
                                     f"{device} B={B} T={T}"))
            measurements.append(m)
            s = summarize(m)
            print(f"[{device} {i}/{len(configs)}] B={B:<3d} T={T:<3d} {s.step_episodes_per_s:6.1f} episodes/s  "
                  f"fit {s.fit_episodes_per_s:6.1f}  {s.ms_per_step:7.1f} ms/step  first "
                  f"{s.first_call_s:5.1f} s  +{s.peak_mb:5.0f} MB  load {s.load_average:4.2f}  "
                  f"({time.perf_counter() - start:4.0f} s)", file=sys.stderr, flush=True)
            if m.gpus_visible and "gpu" not in devices:
                devices.append("gpu")
            if device == "cpu" and check is not None:  # the PyTorch subject, right after
                t = TorchMeasurement(**worker(["--worker", "torch", "--meta-batch-sizes", str(B), "--steps", str(T),
                                               *quick], f"torch B={B} T={T}"))
                pytorch.append(t)
                print(f"[torch {i}/{len(configs)}] B={B:<3d} T={T:<3d} {t.episodes_per_s:6.1f} "
                      f"episodes/s  {statistics.median(t.step_ms):7.1f} ms/step  first "
                      f"{t.first_call_s:5.1f} s  +{t.memory_mb:5.0f} MB  load "
                      f"{t.load_average:4.2f}  ({time.perf_counter() - start:4.0f} s)",
                      file=sys.stderr, flush=True)
    summaries = [summarize(m) for m in measurements]
    loop = breakdown = None
    if args.loop.iterations > 0:
        s = args.loop
        print(f"[loop] meta_train B={s.meta_batch_size} T={s.steps}, {s.iterations} iterations ...",
              file=sys.stderr, flush=True)
        loop = LoopMeasurement(**worker(["--loop-worker", json.dumps(dataclasses.asdict(s))], "loop"))
        breakdown = loop_breakdown(loop)
        print(f"[loop] {breakdown['loop_episodes_per_s']:.1f} episodes/s over {loop.loop_s:.1f} s  "
              f"({time.perf_counter() - start:4.0f} s)", file=sys.stderr, flush=True)

    info["tensorflow"] = measurements[0].tensorflow
    info["devices"] = devices
    info["torch"] = pytorch[0].torch if pytorch else "not installed"
    lines = speed_report(summaries, pytorch, info, args) + pytorch_report(pytorch, check)
    if loop is not None:
        lines += loop_report(loop, breakdown, summaries, pytorch)
    print("\n".join(lines))
    prefix = harness.RESULTS_DIR / ("meta_training_quick" if args.quick else "meta_training")
    write_results(prefix, summaries, measurements, pytorch, check, loop, breakdown,
                  {"machine": info, "meta_batch_sizes": args.meta_batch_sizes, "steps": args.steps,
                   "timing": dataclasses.asdict(args.timing), "loop_settings": dataclasses.asdict(args.loop),
                   "episode": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "seed": SEED,
                               "learning_rate": LEARNING_RATE, "learn_lr": LEARN_LR,
                               "data": str(DATA_DIR.relative_to(REPOSITORY)),
                               "test_alphabets": TEST_ALPHABETS, "val_alphabets": VAL_ALPHABETS}})
    print(f"\nWrote {prefix.with_suffix('.csv')} and {prefix.with_suffix('.json')}")


def side_by_side_main(args: argparse.Namespace) -> None:
    """``--side-by-side``: the check, then one process per (B, T) alternating both learners' steps."""
    if importlib.util.find_spec("torch") is None:
        sys.exit("--side-by-side needs PyTorch, which is not installed (see the docstring).")
    info, quick, start = harness.machine_info(), ["--quick"] if args.quick else [], time.perf_counter()
    worker = functools.partial(harness.run_worker, "meta_training")
    B, T = args.meta_batch_sizes[0], max(args.steps)
    check = TorchCheck(**worker(["--worker", "check", "--meta-batch-sizes", str(B), "--steps", str(T)], "check"))
    pairs = []
    for B, T in itertools.product(args.meta_batch_sizes, args.steps):
        pair = PairMeasurement(**worker(["--worker", "pair", "--meta-batch-sizes", str(B), "--steps", str(T), *quick],
                                        f"pair B={B} T={T}"))
        pairs.append(pair)
        print(f"[pair] B={B:<3d} T={T:<3d} hyper_repr / PyTorch {statistics.median(pair.ratios):.3f} over "
              f"{len(pair.ratios)} pairs  load {pair.load_average:4.2f}  ({time.perf_counter() - start:4.0f} s)",
              file=sys.stderr, flush=True)
    print("\n".join(side_by_side_report(pairs, check, info)))
    path = harness.RESULTS_DIR / ("meta_training_side_by_side_quick.json" if args.quick
                                  else "meta_training_side_by_side.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "check": {**dataclasses.asdict(check), "agree": check.agree},
                                "pairs": [{**dataclasses.asdict(p), "ratios": p.ratios} for p in pairs]}, indent=1))
    print(f"\nWrote {path}")


def side_by_side_report(pairs: Sequence[PairMeasurement], check: TorchCheck, info: dict) -> list[str]:
    """The table of ``--side-by-side``, the target's verdict per row, and the check."""
    median, rows = statistics.median, []
    for p in pairs:
        ratio = median(p.ratios)
        low, _, high = statistics.quantiles(p.ratios, n=4) if len(p.ratios) > 1 else (ratio, ratio, ratio)
        tf_ms, torch_ms, network_ms = median(p.tf_ms), median(p.torch_ms), median(p.network_ms)
        rows.append([str(p.meta_batch_size), str(p.steps), f"{tf_ms:.1f}", f"{torch_ms:.1f}",
                     f"{1e3 * p.meta_batch_size / tf_ms:.1f}", f"{1e3 * p.meta_batch_size / torch_ms:.1f}",
                     f"{ratio:.3f}", f"{low:.2f}-{high:.2f}", str(len(p.ratios)),
                     "PASS" if ratio >= TARGET_RATIO else "FAIL", f"{network_ms:.1f}",
                     f"{median(t / n for t, n in zip(p.torch_ms, p.network_ms)):.2f}", f"{p.load_average:.1f}"])
    c = check
    return [
        "hyper_repr.HyperRepresentation and the PyTorch subject side by side, Omniglot 5-way 1-shot (15 queries per",
        f"  class), float32; TF {info['tensorflow-cpu']}, torch {info['torch']}; {info['cpu_count']} CPUs "
        f"({info['cpu']}); 1-min load average {info['load_average'][0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end.",
        "  One process per (B, T): both learners built and warmed up, then their steps alternate on the same pre-drawn",
        "  meta-batches (which goes first alternates too); ratio: the median over the pairs of PyTorch's step time",
        "  over hyper_repr's (= hyper_repr / PyTorch in episodes/s), with its quartiles.",
        "",
        table(["B", "T", "hyper_repr ms", "PyTorch ms", "hyper_repr episodes/s", "PyTorch episodes/s", "ratio",
               "quartiles", "pairs", f"≥ {TARGET_RATIO:g}", "network ms", "bound", "load"], rows),
        "  network ms: h_λ forward and backward alone on the same meta-batch's support and query images (network_passes,",
        "  timed after each pair); bound: PyTorch's step over it (median of the pairs), the ratio hyper_repr would reach",
        "  if everything else in its step (heads, loss, update, far_ho2, Python) took no time.",
        f"  Check (B = {c.meta_batch_size}, T = {c.steps}, the TF network's initial weights copied): relative "
        f"differences E {c.loss_error:.1e}, ‖∇E‖ {c.norm_error:.1e}, worst hyperparameter {c.worst_error:.1e}; in "
        f"float64 {c.float64_worst_error:.1e}: {'the same function' if c.agree else 'DIFFERENT functions'}."]


def strategy_main(args: argparse.Namespace) -> None:
    """``--strategy mirrored``: a row per (device, R, B, T), each in a fresh process (R logical CPU
    devices must be configured before TensorFlow starts), and one without a strategy."""
    info = harness.machine_info()
    quick = ["--quick"] if args.quick else []
    start, measurements = time.perf_counter(), []
    devices = ["cpu"]
    for device in devices:  # "gpu" is appended when a CPU worker saw GPUs
        gpus = measurements[-1].gpus_visible if measurements else 0
        counts = args.replicas if device == "cpu" else [r for r in args.replicas if r <= gpus]
        for B, T in itertools.product(args.meta_batch_sizes, args.steps):
            for strategy, replicas in [("none", 1)] + [("mirrored", r) for r in counts]:
                spec = dict(device=device, strategy_name=strategy, replicas=replicas, meta_batch_size=B, steps=T)
                m = ReplicaMeasurement(**harness.run_worker(
                    "meta_training", ["--replica-worker", json.dumps(spec), *quick],
                    f"{device} {strategy} R={replicas}"))
                measurements.append(m)
                step, _, reduce = m.medians
                print(f"[{device} {strategy} R={replicas}] B={B} T={T}: {1e3 * B / step:6.1f} episodes/s, "
                      f"all-reduce {reduce:.2f} of {step:.1f} ms  "
                      f"({time.perf_counter() - start:4.0f} s)", file=sys.stderr, flush=True)
        if device == "cpu" and measurements[-1].gpus_visible:
            devices.append("gpu")
    info["tensorflow"] = measurements[0].tensorflow
    print("\n".join(replica_report(measurements, info, args.timing)))
    prefix = harness.RESULTS_DIR / ("meta_training_mirrored_quick" if args.quick else "meta_training_mirrored")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".json"), "w") as f:
        json.dump({"machine": info, "timing": dataclasses.asdict(args.timing),
                   "measurements": [dataclasses.asdict(m) for m in measurements]}, f, indent=1)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["device", "strategy", "replicas", "meta_batch_size", "steps", "episodes_per_s",
                         "step_ms", "compute_ms", "all_reduce_ms", "all_reduce_share", "first_call_s", "load"])
        for m in measurements:
            step, compute, reduce = m.medians
            writer.writerow([m.device, m.strategy, m.replicas, m.meta_batch_size, m.steps,
                             1e3 * m.meta_batch_size / step, step, compute, reduce, reduce / step, m.first_call_s, m.load_average])
    print(f"\nWrote {prefix.with_suffix('.csv')} and {prefix.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
