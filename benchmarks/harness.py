"""What the benchmark scripts share: worker processes (one configuration in a fresh Python
process, so that its memory baseline and peak are its own; it prints one JSON line), timing and
peak-memory probes, plain-text tables, the machine and source description written next to the
results, and the results folder.

Each script runs from the repository root as ``python -m benchmarks.NAME`` or
``python benchmarks/NAME.py``.
"""

import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
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
