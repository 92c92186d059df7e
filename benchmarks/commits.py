"""No speed regression between two commits, measured side by side in one run.

Checks out ``--base`` (default ``HEAD~1``) into a temporary folder and runs the same benchmark
worker in it and in this working tree, alternately (base, new, base, new, … for ``--rounds``
rounds: the machine's drift touches both alike), each in a fresh process:

* ``hypergradient_cost``: the side-by-side ratio far_ho2 ``ReverseHG`` / JAX (``far_ho2_vs_jax``:
  both built in one process and called alternately; the median ratio of adjacent calls) at each
  T of ``--steps``; a ratio to JAX measured in the same process is robust to the machine's load.
* ``meta_training``: hyper-representation meta-training episodes/s (``train_on_batch`` on
  pre-drawn meta-batches; median over the timed chunks) at each (B, T).

Prints, per configuration, the median over rounds of each commit's figure and new / base
(for the JAX ratio lower is better, for episodes/s higher), and whether it is within
``--tolerance`` (default 3 %).

    python -m benchmarks.commits --base 404e4b1 --rounds 3
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, NamedTuple, Sequence

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


class Figure(NamedTuple):
    name: str  # what is measured, for the table
    command: Callable[[int], list[str]]  # round -> the worker's arguments (after `python -m`)
    value: Callable[[dict], float]  # the worker's JSON -> the figure
    higher_is_better: bool


def figures(steps: Sequence[int], meta: Sequence[tuple[int, int]]) -> list[Figure]:
    out = [Figure(f"ReverseHG / JAX, T = {T}",
                  lambda r, T=T: ["benchmarks.hypergradient_cost", "--worker", "far_ho2_vs_jax", "--steps", str(T),
                                  "--repeats", "20", "--round", str(r)],
                  lambda result: statistics.median(result["ratios"]), False) for T in steps]
    out += [Figure(f"meta-training episodes/s, B = {B}, T = {T}",
                   lambda r, B=B, T=T: ["benchmarks.meta_training", "--worker", "cpu", "--meta-batch-sizes", str(B),
                                        "--steps", str(T)],
                   lambda result: statistics.median(result["step_rates"]), True) for B, T in meta]
    return out


def run_worker(checkout: pathlib.Path, arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", *arguments], cwd=checkout, capture_output=True, text=True,
                          env={"PYTHONPATH": str(checkout), "TF_CPP_MIN_LOG_LEVEL": "2",
                               "PATH": "/usr/bin:/bin"}, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{' '.join(arguments)} in {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare with (default HEAD~1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations base/new (default 3)")
    parser.add_argument("--steps", type=int, nargs="*", default=[50], help="T of hypergradient_cost (default 50)")
    parser.add_argument("--meta", type=int, nargs="*", default=[4, 5],
                        help="B T pairs of meta_training (default 4 5)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="the accepted slow-down (default 0.03)")
    args = parser.parse_args(argv)
    if len(args.meta) % 2 or args.rounds < 1:
        parser.error("--meta takes B T pairs; --rounds must be positive")
    meta = list(zip(args.meta[::2], args.meta[1::2]))
    with tempfile.TemporaryDirectory() as folder:
        base = pathlib.Path(folder) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=REPOSITORY, check=True,
                       capture_output=True)
        try:
            measured = {(f.name, which): [] for f in figures(args.steps, meta) for which in ("base", "new")}
            for r in range(args.rounds):
                for figure in figures(args.steps, meta):
                    for which, checkout in (("base", base), ("new", REPOSITORY)):
                        measured[figure.name, which].append(figure.value(run_worker(checkout, figure.command(r))))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPOSITORY, capture_output=True)
    print(f"base {args.base}, new: the working tree; {args.rounds} rounds, medians")
    print(f"{'figure':<44s} {'base':>9s} {'new':>9s} {'new/base':>9s}  within {args.tolerance:.0%}")
    for figure in figures(args.steps, meta):
        old, new = (statistics.median(measured[figure.name, w]) for w in ("base", "new"))
        change = new / old
        ok = change >= 1 - args.tolerance if figure.higher_is_better else change <= 1 + args.tolerance
        print(f"{figure.name:<44s} {old:9.3f} {new:9.3f} {change:9.3f}  {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main(sys.argv[1:])
