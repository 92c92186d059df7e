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
meta-batch size, T = the largest). PyTorch is not a dependency (its Linux wheel on PyPI brings
CUDA): ``pip install torch --index-url https://download.pytorch.org/whl/cpu`` installs the CPU
build; without it the script says so and skips the subject.

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

Run from the repository root (about 10 minutes on 2 cores at load 3-5 with the PyTorch subject,
less when idle; ``--quick``: B = 4, T ∈ {1, 5}, short timing and a 20-iteration loop, a smoke run
of about 2 minutes on an idle machine):

    python benchmarks/meta_training.py
    python benchmarks/meta_training.py --meta-batch-sizes 4 --steps 5 --loop-iterations 2000
    python benchmarks/meta_training.py --quick

Progress goes to stderr, the tables to stdout; the results are written to
``benchmarks/results/meta_training[_quick].{csv,json}``. The worker modes (``--worker
cpu|gpu|torch|check`` with one B and T, ``--loop-worker``) are internal: they print one JSON line.

References:
    Franceschi, Frasconi, Salzo, Grazzi, Pontil. Bilevel Programming for Hyperparameter
    Optimization and Meta-Learning. ICML 2018, arXiv:1806.04910.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from hypergradient_cost import fmt, machine_info, max_rss_mb, table, timed

REPOSITORY = Path(__file__).resolve().parent.parent
DATA_DIR = REPOSITORY / "data" / "omniglot"
TEST_ALPHABETS, VAL_ALPHABETS = ("Sanskrit", "Tagalog"), ("Early_Aramaic",)
WAYS, SHOTS, QUERIES, SEED = 5, 1, 15, 0
LEARNING_RATE, LEARN_LR = 0.1, True  # flags/omniglot.py's defaults
DEFAULT_BATCH_SIZES, DEFAULT_STEPS = (4, 16), (1, 5, 10)
QUICK_BATCH_SIZES, QUICK_STEPS = (4,), (1, 5)
META_LR, META_LR_DECAY = 1e-3, 1e-5  # MetaLearner's outer Adam: meta_lr / (1 + decay·iteration)
ADAM_EPSILON, ADAM_BETA2 = 1e-7, 0.999  # Keras's Adam defaults
NORM_EPSILON, MIN_LR = 1e-3, 1e-6  # TransductiveBatchNormalization's ε; η's constraint η ≥ 1e-6
CHECK_TOLERANCE = 1e-4  # relative: E and ‖∇E‖ of hyper_repr and the PyTorch subject
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


def first_call_and_warm_up(call: Callable[[], None], seconds: float) -> float:
    """Times the first (tracing) call of ``call``, then calls it for ``seconds``; returns the
    first call's seconds."""
    first = timed(call)
    warm_until = time.perf_counter() + seconds
    while time.perf_counter() < warm_until:
        call()
    return first


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

    first_call_s = first_call_and_warm_up(step_only, timing.warmup_seconds)
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
    network, ``MetaLearner(learning_rate=0.1, learn_lr=True)`` and its defaults):

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

    @property
    def agree(self) -> bool:
        return max(self.loss_error, self.norm_error) <= CHECK_TOLERANCE


def check_torch(meta_batch_size: int, steps: int) -> TorchCheck:
    """E, ∇E and the first meta-step of both learners on meta-batch 1 of the training stream, the
    TF network's initial weights copied into the PyTorch one."""
    from hyper_repr import meta_learner
    from hyper_repr.models import build_network

    batch = pre_drawn(meta_batch_size, count=1)[0]
    network = build_network("omniglot", tuple(batch.support_x.shape[2:]), seed=SEED,
                            dtype="float32")
    learner = meta_learner.MetaLearner(network, ways=WAYS, meta_batch_size=meta_batch_size,
                                       steps=steps, learning_rate=LEARNING_RATE, learn_lr=LEARN_LR)
    weights = [v.numpy() for v in network.trainable_variables]  # kernel, offset, kernel, …
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

    loss, grads = learner.hypergradients(batch)
    torch_loss, torch_grads = subject.hypergradients(torch_batch)
    grads, torch_grads = tf_values(grads), torch_values(torch_grads)
    assert [g.shape for g in grads] == [g.shape for g in torch_grads], "hyperparameter order"
    before, torch_before = tf_values(learner.hypers), torch_values(subject.hypers)
    learner.meta_step(batch)
    subject.meta_step(torch_batch)
    update = [a - b for a, b in zip(tf_values(learner.hypers), before)]
    torch_update = [a - b for a, b in zip(torch_values(subject.hypers), torch_before)]
    losses = (float(loss), torch_loss.item())
    norms = tuple(float(np.sqrt(sum(np.sum(g**2) for g in gs))) for gs in (grads, torch_grads))
    worst = max(error([a], [b]) for a, b in zip(grads, torch_grads))
    return TorchCheck(meta_batch_size, steps, losses, abs(losses[1] / losses[0] - 1), norms,
                      abs(norms[1] / norms[0] - 1), worst,
                      (float(grads[-1]), float(torch_grads[-1])), error(update, torch_update))


# -- worker 4: the training loop, instrumented from outside ----------------------------------------

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
                     f"{s.pipeline_episodes_per_s:.1f}", f"{100 * s.pipeline_cost:+.0f}%", f"{s.ms_per_step:.1f}",
                     f"{s.cpu_ms_per_step:.0f} / {s.pipeline_cpu_ms_per_step:.0f}",
                     f"{s.ms_per_episode:.1f}", f"{s.pipeline_alone_ms:.2f}", f"{s.first_call_s:.1f}",
                     f"{s.peak_mb:.0f}", fmt(s.gpu_peak_mb, ".0f"), fmt(rate, ".1f"),
                     fmt(rate and s.step_episodes_per_s / rate, ".2f"),
                     fmt(rate and s.pipeline_episodes_per_s / rate, ".2f"),
                     f"{s.load_average:.1f}"])
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
        "  PyTorch: episodes/s of the PyTorch subject in this run (the same model, maths and",
        "  pre-drawn meta-batches; table below); ratio = hyper_repr / PyTorch, step-only and with",
        "  the pipeline (> 1: hyper_repr is faster).",
        f"  The first meta-batch of a stream takes ≤ {started:.3f} s from episode 0 and ≤ {resumed:.3f} s from "
        f"episode {RESUME_EPISODE:,} (resuming skips nothing).",
    ]
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
            f"  first Adam update ‖Δλ_TF − Δλ_PyTorch‖/‖Δλ_TF‖ {c.update_error:.1e}: {verdict} "
            f"(tolerance {CHECK_TOLERANCE:.0e} on E and ‖∇E‖)."]


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


def loop_report(m: LoopMeasurement, b: dict, summaries: Sequence[Summary],
                pytorch: Sequence[TorchMeasurement]) -> list[str]:
    s, parts = m.settings, b["components"]
    raw = next((x for x in summaries if x.device == "cpu" and x.meta_batch_size == s["meta_batch_size"]
                and x.steps == s["steps"]), None)
    reference = raw and pytorch_rate(raw, pytorch)

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
            "", table(["episodes/s", "", f"vs PyTorch {fmt(reference, '.1f')}"],
                      [[name, f"{v:.1f}", fmt(reference and v / reference, ".2f")]
                       for name, v in rates]),
            f"  projected: {b['long_run_fixed_s']:.1f} s of one-off tracing (first meta_step and evaluate, beyond a "
            f"steady call), then per iteration meta_step + next + rest, and every {s['eval_every']} iterations one "
            "evaluate + one save."]


def write_results(prefix: Path, summaries: Sequence[Summary], measurements: Sequence[Measurement],
                  pytorch: Sequence[TorchMeasurement], check: Optional[TorchCheck],
                  loop: Optional[LoopMeasurement], breakdown: Optional[dict], meta: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        fields = [field.name for field in dataclasses.fields(Summary)]
        writer = csv.DictWriter(f, fieldnames=fields + ["pytorch_episodes_per_s", "ratio_step",
                                                        "ratio_pipeline"])
        writer.writeheader()
        for s in summaries:
            rate = pytorch_rate(s, pytorch)
            writer.writerow({**dataclasses.asdict(s), "pytorch_episodes_per_s": rate,
                             "ratio_step": rate and s.step_episodes_per_s / rate,
                             "ratio_pipeline": rate and s.pipeline_episodes_per_s / rate})
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
    parser.add_argument("--worker", choices=("cpu", "gpu", "torch", "check"),
                        help=argparse.SUPPRESS)
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
    if args.worker:  # internal: one (device, B, T) in this fresh process, or the PyTorch check
        B, T = args.meta_batch_sizes[0], args.steps[0]
        if args.worker == "check":
            result = check_torch(B, T)
        elif args.worker == "torch":
            result = measure_torch(B, T, args.timing)
        else:
            result = measure(args.worker, B, T, args.timing)
        print(json.dumps(dataclasses.asdict(result)))
        return
    if args.loop_worker is not None:  # internal: the instrumented meta_train run
        print(json.dumps(dataclasses.asdict(measure_loop(LoopSettings(**args.loop_worker)))))
        return
    info = machine_info()
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
        check = TorchCheck(**run_worker(["--worker", "check", "--meta-batch-sizes", str(B),
                                         "--steps", str(T)], "check"))
        print(f"[check] B={B} T={T}: relative differences E {check.loss_error:.1e}, ‖∇E‖ "
              f"{check.norm_error:.1e}  ({time.perf_counter() - start:4.0f} s)",
              file=sys.stderr, flush=True)
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
            if device == "cpu" and check is not None:  # the PyTorch subject, right after
                t = TorchMeasurement(**run_worker(
                    ["--worker", "torch", "--meta-batch-sizes", str(B), "--steps", str(T), *quick],
                    f"torch B={B} T={T}"))
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
        loop = LoopMeasurement(**run_worker(["--loop-worker", json.dumps(dataclasses.asdict(s))], "loop"))
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
    prefix = RESULTS_DIR / ("meta_training_quick" if args.quick else "meta_training")
    write_results(prefix, summaries, measurements, pytorch, check, loop, breakdown,
                  {"machine": info, "meta_batch_sizes": args.meta_batch_sizes, "steps": args.steps,
                   "timing": dataclasses.asdict(args.timing), "loop_settings": dataclasses.asdict(args.loop),
                   "episode": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "seed": SEED,
                               "learning_rate": LEARNING_RATE, "learn_lr": LEARN_LR,
                               "data": str(DATA_DIR.relative_to(REPOSITORY)),
                               "test_alphabets": TEST_ALPHABETS, "val_alphabets": VAL_ALPHABETS}})
    print(f"\nWrote {prefix.with_suffix('.csv')} and {prefix.with_suffix('.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
