"""What the benchmark scripts share: worker processes (one configuration in a fresh Python
process, so that its memory baseline and peak are its own; it prints one JSON line), timing and
peak-memory probes, plain-text tables, the machine and source description written next to the
results, and the results folder.

Each script runs from the repository root as ``python -m benchmarks.NAME`` or
``python benchmarks/NAME.py``.
"""

import collections
import dataclasses
import glob
import importlib.metadata
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPOSITORY / "benchmarks" / "results"


def worker_env(**extra: str) -> dict:
    """The environment of a worker: TensorFlow's C++ info logs off, plus ``extra``."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)


def run_worker(module: str, arguments: Sequence[str], label: str, env: Optional[dict] = None,
               timeout: Optional[float] = None) -> dict:
    """``python -m benchmarks.<module> *arguments`` in a fresh process from the repository root;
    its last stdout line that is a JSON object. A failure raises with the worker's stderr."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *arguments], capture_output=True, text=True,
                          env=env or worker_env(), cwd=REPOSITORY, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def max_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(call: Callable[[], None]) -> float:
    """Seconds taken by one call."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def relative_error(actual: Any, expected: Any, zero: float = 1e-12) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius, float64); the absolute error ‖actual‖ when the
    reference is zero up to round-off (‖expected‖ ≤ ``zero``)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > zero else 1.0))


def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted, or "-" for a missing one."""
    return "-" if value is None else format(value, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> str:
    """An aligned plain-text table: the first ``left`` columns flush left, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def source_state() -> str:
    """The repository's commit, and the far_ho2 files changed since (read-only git queries)."""
    try:
        def git(*arguments: str) -> str:
            return subprocess.run(["git", "-C", str(REPOSITORY), *arguments], capture_output=True, text=True,
                                  check=True).stdout
        changed = [line[3:] for line in git("status", "--porcelain", "--", "far_ho2").splitlines()]
        commit = git("rev-parse", "--short", "HEAD").strip()
        return commit + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def machine_info(distributions: Sequence[str] = ("tensorflow-cpu", "keras", "jax", "jaxlib", "torch", "numpy")
                 ) -> dict[str, Any]:
    """Python, platform, CPU, load, the far_ho2 source and package versions, for the results."""
    def version(distribution: str) -> str:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": models[0] if models else platform.processor(), "far_ho2_source": source_state(),
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),  # None: far_ho2's default
            **{d: version(d) for d in distributions}, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# -- the machine's limit, and where the time goes ----------------------------------------------------

PEAK_SIZE = 2048  # the matrix product that measures the machine's peak: PEAK_SIZE³, float32


def peak_gflops(size: int = PEAK_SIZE, calls: int = 8) -> float:
    """This machine's measured peak, in GFLOP/s: the best of ``calls`` float32 products of two
    size × size matrices in TensorFlow (2·size³ operations each), after one warm-up call. The
    benchmarks divide the arithmetic of each configuration by its time and by this number, in the
    same process, for the fraction of the peak it reaches."""
    import tensorflow as tf

    a, b = tf.random.normal([size, size], seed=1), tf.random.normal([size, size], seed=2)
    product = tf.function(lambda: tf.matmul(a, b)[0, 0])  # the corner needs the whole product
    product().numpy()
    best = min(timed(lambda: product().numpy()) for _ in range(calls))
    return 2 * size**3 / best / 1e9


@dataclasses.dataclass
class Profile:
    """Where the time of one call goes, from TensorFlow's profiler (``profile``)."""

    wall_ms: float  # per call, while profiled
    graph_ms: float  # inside the traced function(s) per call; wall − graph = Python and dispatch
    op_ms: dict  # category -> ms of op time per call, summed over the threads (may exceed the wall)

    def shares(self) -> dict:
        """Each category's fraction of the op time."""
        total = sum(self.op_ms.values()) or 1.0
        return {name: ms / total for name, ms in self.op_ms.items()}

    def describe(self) -> str:
        """One line: wall, in-graph, Python and dispatch, then the categories' op time."""
        total = sum(self.op_ms.values()) or 1.0
        parts = ", ".join(f"{name} {ms:.1f} ms ({ms / total:.0%})"
                          for name, ms in sorted(self.op_ms.items(), key=lambda kv: -kv[1]))
        return (f"{self.wall_ms:.1f} ms per call, {self.graph_ms:.1f} in the graph, "
                f"{self.wall_ms - self.graph_ms:.1f} Python and dispatch; op time: {parts}")


# One run of an XLA-compiled function on the CPU (a ``jit_compile=True`` function inside a graph): its
# fused kernels are not TensorFlow ops, so ``profile`` books the run whole as XLA_CODE
XLA_EXECUTION, XLA_CODE = "CpuExecutable::ExecuteAsyncOnStream", "XLA-compiled code"


def profile(call: Callable[[], None], calls: int, categories: Sequence[tuple[str, str]]) -> Profile:
    """Runs ``call`` ``calls`` times under TensorFlow's profiler (after the caller's warm-up) and
    sums each op's duration into the first category whose regular expression matches the op's
    name, or "other". The names carry far_ho2's name scopes (``features``, ``inner_run``,
    ``outer``, ``reverse_pass``, ``update``, ``guard``); a gradient op is named ``gradient_tape/``
    and its forward op's name (``gradient_tape/inner_run/…``: the inner gradient of a step;
    ``gradient_tape/gradient_tape/inner_run/…``: its derivative in the reverse pass of unrolled
    steps; the steps of compiled loops keep their loop's scope). Op times add over the threads
    that ran them."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    patterns = [(name, re.compile(pattern)) for name, pattern in categories]
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]).read_bytes())
    op_ps, graph_ps = collections.Counter(), 0
    for plane in space.planes:
        for line in plane.lines:
            if line.name.startswith("tf_numa"):  # XLA's own worker threads: inside XLA_EXECUTION already
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name == "KernelAndDeviceFunc::Run":
                    graph_ps += event.duration_ps
                elif name == XLA_EXECUTION:
                    op_ps[XLA_CODE] += event.duration_ps
                elif ":" in name and "::" not in name and not name.startswith(("ExecutorState", "EagerLocalExecute")):
                    op = name.rpartition(":")[0]
                    category = next((label for label, pattern in patterns if pattern.search(op)), "other")
                    op_ps[category] += event.duration_ps
    return Profile(1e3 * wall / calls, graph_ps / 1e9 / calls, {k: v / 1e9 / calls for k, v in op_ps.items()})
