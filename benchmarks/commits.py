"""No speed regression between two commits, measured side by side in one run.

Checks out ``--base`` (default ``HEAD~1``) and ``--new`` (default ``HEAD``) into temporary
folders and runs the same benchmark worker in each, alternately (base, new, base, new, … for
``--rounds`` rounds: the machine's drift touches both alike), each in a fresh process:

* ``hypergradient_cost``: the side-by-side ratio far_ho2 ``ReverseHG`` / JAX (``far_ho2_vs_jax``:
  both built in one process and called alternately; the median ratio of adjacent calls) at each
  T of ``--steps``; a ratio to JAX measured in the same process is robust to the machine's load.
* ``meta_training``: hyper-representation meta-training episodes/s (``train_on_batch`` on
  pre-drawn meta-batches; median over the timed chunks) at each (B, T).
* ``bilevel_methods`` (with ``--cleaning``): each method's hyper-cleaning run on the bundled
  digits (a third of the labels corrupted, ``--budget`` seconds, seed = round): hyper-iterations
  per second (1 / the run's median seconds per hyper-iteration) and the test accuracy after
  retraining; the accuracies' mean ± sd over the rounds (seeds) of both commits, and whether
  the means differ by less than the larger sd (the table within its seed spread).

Prints, per configuration, the median over rounds of each commit's figure and new / base
(for the JAX ratio lower is better, for episodes/s higher), and whether it is within
``--tolerance`` (default 3 %).

    python -m benchmarks.commits --base 404e4b1 --rounds 3
    python -m benchmarks.commits --base 404e4b1 --rounds 3 --cleaning --steps --meta
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
    seeded: bool = False  # an accuracy over seeds (compared within its spread), not a speed


CORRUPTION = 1 / 3
CLEANING = ("ReverseHG", "ReverseHG truncated K=25", "ForwardHG (η, log ρ only)", "ImplicitHG cg", "BOME", "Penalty",
            "StochasticHG reversed")  # benchmarks.bilevel_methods.METHODS' labels, in both commits


def cleaning_run(label: str, budget: float) -> Callable[[int], list[str]]:
    return lambda r: ["benchmarks.bilevel_methods", "--worker", label, str(CORRUPTION), str(r), str(budget)]


def figures(steps: Sequence[int], meta: Sequence[tuple[int, int]], cleaning: Sequence[str] = (),
            budget: float = 12.0) -> list[Figure]:
    out = [Figure(f"ReverseHG / JAX, T = {T}",
                  lambda r, T=T: ["benchmarks.hypergradient_cost", "--worker", "far_ho2_vs_jax", "--steps", str(T),
                                  "--repeats", "20", "--round", str(r)],
                  lambda result: statistics.median(result["ratios"]), False) for T in steps]
    out += [Figure(f"meta-training episodes/s, B = {B}, T = {T}",
                   lambda r, B=B, T=T: ["benchmarks.meta_training", "--worker", "cpu", "--meta-batch-sizes", str(B),
                                        "--steps", str(T)],
                   lambda result: statistics.median(result["step_rates"]), True) for B, T in meta]
    out += [Figure(f"hyper-cleaning it/s, {label}", cleaning_run(label, budget),
                   lambda result: 1 / result["seconds_median"], True) for label in cleaning]
    out += [Figure(f"hyper-cleaning test acc %, {label}", cleaning_run(label, budget),
                   lambda result: 100 * result["test_accuracy"], True, seeded=True) for label in cleaning]
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
    parser.add_argument("--new", default="HEAD", help="the commit measured against --base (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations base/new (default 3)")
    parser.add_argument("--steps", type=int, nargs="*", default=[50], help="T of hypergradient_cost (default 50)")
    parser.add_argument("--meta", type=int, nargs="*", default=[4, 5],
                        help="B T pairs of meta_training (default 4 5)")
    parser.add_argument("--cleaning", action="store_true", help="also every method's hyper-cleaning run")
    parser.add_argument("--budget", type=float, default=12.0, help="seconds of a hyper-cleaning run (default 12)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="the accepted slow-down (default 0.03)")
    args = parser.parse_args(argv)
    if len(args.meta) % 2 or args.rounds < 1 or args.budget <= 0:
        parser.error("--meta takes B T pairs; --rounds and --budget must be positive")
    meta = list(zip(args.meta[::2], args.meta[1::2]))
    chosen = figures(args.steps, meta, CLEANING if args.cleaning else (), args.budget)
    measured = {(f.name, which): [] for f in chosen for which in ("base", "new")}
    with tempfile.TemporaryDirectory() as folder:
        checkouts = {which: pathlib.Path(folder) / which for which in ("base", "new")}
        for which, commit in (("base", args.base), ("new", args.new)):  # fresh trees: no earlier results reused
            subprocess.run(["git", "worktree", "add", "--detach", str(checkouts[which]), commit], cwd=REPOSITORY,
                           check=True, capture_output=True)
        try:
            for r in range(args.rounds):
                done: dict = {}  # one worker run gives every figure of its command
                for figure in chosen:
                    for which, checkout in checkouts.items():
                        key = (which, tuple(figure.command(r)))
                        if key not in done:
                            done[key] = run_worker(checkout, figure.command(r))
                        measured[figure.name, which].append(figure.value(done[key]))
        finally:
            for checkout in checkouts.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=REPOSITORY,
                               capture_output=True)
    print(f"base {args.base}, new {args.new}; {args.rounds} rounds; speed: medians, new/base within "
          f"{args.tolerance:.0%}; accuracy: mean ± sd over the rounds' seeds, means within the larger sd")
    print(f"{'figure':<52s} {'base':>13s} {'new':>13s} {'new/base':>9s}  within")
    for figure in chosen:
        old, new = (measured[figure.name, w] for w in ("base", "new"))
        if figure.seeded:
            spread = max(statistics.pstdev(old), statistics.pstdev(new))
            ok = abs(statistics.mean(new) - statistics.mean(old)) <= spread
            cells = [f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}" for v in (old, new)]
            print(f"{figure.name:<52s} {cells[0]:>13s} {cells[1]:>13s} {'':>9s}  {'yes' if ok else 'NO'}")
            continue
        change = statistics.median(new) / statistics.median(old)
        ok = change >= 1 - args.tolerance if figure.higher_is_better else change <= 1 + args.tolerance
        print(f"{figure.name:<52s} {statistics.median(old):13.3f} {statistics.median(new):13.3f} {change:9.3f}  "
              f"{'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main(sys.argv[1:])
