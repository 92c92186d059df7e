"""Every bilevel method on one real problem, side by side: data hyper-cleaning on the bundled
8×8 digits (``flags.hyper_cleaning``), a third or half of the 800 training labels corrupted, one
weight σ(λ_i) per training example, softmax regression with (ρ/2)‖θ‖², ρ = 1e-3.

Each method runs with the launcher's defaults (``flags.hyper_cleaning.METHOD_DEFAULTS``: T, η,
λ's optimizer and rate, BOME's and the penalty method's official settings) for the same
wall-clock budget of hyper-iterations (``--budget`` seconds, tracing included) per seed, in a
process of its own (its peak memory is its own). Reported per method and corruption, mean ±
standard deviation over the seeds:

- test accuracy after retraining from the initial weights with the learned weights (normalised
  to mean 1), by the launcher's one retraining, the same for every method and for the two
  baselines (uniform weights, "all noisy data"; the corrupted examples removed, "clean
  oracle"): 1000 GD steps at rate 0.5 with ρ = 1e-3, whatever η or ρ the method learned;
- the test accuracy of the model the method itself ends with (its w_T(λ), or BOME's and the
  penalty method's persistent w);
- precision, recall and F1 of flagging σ(λ_i) < ½ as corrupted;
- hyper-iterations done, the median seconds of one (the first, which traces, left out), and
  the peak resident memory of the process above its baseline after importing TensorFlow;
- test accuracy against time: ``bilevel_methods.png`` (the mean over seeds of the accuracy of
  the method's current model, at each second of the budget).

ForwardHG carries one tangent per scalar hyperparameter: it learns η and log ρ only, no example
weight, so it flags nothing (its F1 is "n/a") and its retrained weights are the baseline's.

Each run keeps its folder under ``benchmarks/results/bilevel_methods/``, named after its
settings (a hash of them): a killed benchmark started again resumes each run from its last
checkpoint and reuses finished ones, never a run made with other settings.

    python -m benchmarks.bilevel_methods            # 5 seeds, 12 s per run: about 35 minutes here
    python -m benchmarks.bilevel_methods --quick    # 1 seed, 6 s per run
"""

import argparse
import hashlib
import json
import sys
from typing import Any

import numpy as np

from benchmarks import harness

CORRUPTIONS = (1 / 3, 0.5)
METHODS = {  # label: the flags.hyper_cleaning.Config settings besides the launcher's defaults
    "ReverseHG": dict(method="reverse"),
    "ReverseHG truncated K=25": dict(method="reverse", method_settings={"truncate": 25}),
    "ForwardHG (η, log ρ only)": dict(method="forward"),
    "ImplicitHG cg": dict(method="implicit"),
    "BOME": dict(method="bome"),
    "Penalty": dict(method="penalty"),
    "StochasticHG reversed": dict(method="stochastic"),
}
FOLDER = harness.RESULTS_DIR / "bilevel_methods"
NOT_CLEANING = "n/a"  # the F1 cells of ForwardHG, which learns no example weight


RUN_SUMMARY = "benchmark_run.json"  # in a run's folder once it has finished


def run_name(label: str, corruption: float, seed: int, budget: float) -> str:
    """The folder of a run: its label, corruption, budget and seed, and a hash of its settings
    (so that a run made with other settings, e.g. before the launcher's defaults changed, is
    not reused)."""
    slug = "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
    settings = hashlib.sha256(json.dumps(METHODS[label], sort_keys=True).encode()).hexdigest()[:8]
    return f"c{round(100 * corruption)}_{budget:g}s_{slug}_{settings}_seed{seed}"


def worker(label: str, corruption: float, seed: int, budget: float) -> dict:
    """One run in this process (resumed from its folder if it was cut short; read back if it
    finished): the launcher's results, timing and memory, and the accuracy of the method's
    model against the elapsed time."""
    logdir = FOLDER / run_name(label, corruption, seed, budget)
    if (logdir / RUN_SUMMARY).exists():
        return json.loads((logdir / RUN_SUMMARY).read_text())
    baseline_mb = harness.max_rss_mb()
    from flags import hyper_cleaning  # TensorFlow is imported here
    imported_mb = harness.max_rss_mb()
    config = hyper_cleaning.Config(**METHODS[label], corruption=corruption, seed=seed, time_budget=budget)
    results = hyper_cleaning.run_experiment(config, logdir)
    rows = hyper_cleaning.workdir.read_metrics(logdir)
    seconds = [r["seconds"] for r in rows]
    run = {"label": label, "corruption": corruption, "seed": seed, "config": results["config"], **results["metrics"],
           "seconds_median": float(np.median(seconds[1:] or seconds)),
           "peak_mb": harness.max_rss_mb() - imported_mb, "import_mb": imported_mb - baseline_mb,
           "curve": [[r["elapsed_seconds"], r["test_accuracy"]] for r in rows]}
    (logdir / RUN_SUMMARY).write_text(json.dumps(run))
    return run


def mean_sd(values: list) -> str:
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f}"


def shared(mine: list, seed: int, key: str) -> float:
    """The ``key`` accuracy (baseline or oracle) of ``seed``, which every method's run retrains
    alike; a clear error if two runs disagree (their rows would not be comparable)."""
    values = {r["label"]: r[key] for r in mine if r["seed"] == seed}
    if len(set(values.values())) > 1:
        raise ValueError(f"seed {seed}: the runs' {key} differ, {values}: the rows are not comparable.")
    return next(iter(values.values()))


def scores(group: list, key: str) -> str:
    """Mean ± sd of a detection score, or n/a for a method that learns no example weight."""
    return mean_sd([r[key] for r in group]) if all(key in r for r in group) else NOT_CLEANING


def summary(runs: list, corruption: float) -> tuple[list, list]:
    """The table rows of one corruption level: the two baselines, then every method."""
    mine = [r for r in runs if r["corruption"] == corruption]
    seeds = sorted({r["seed"] for r in mine})
    rows = [["all noisy data (uniform weights)", mean_sd([shared(mine, s, "baseline_test_accuracy") for s in seeds]),
             "-", "-", "-", "-", "-", "-", "-", "-"],
            ["clean oracle (corrupted removed)", mean_sd([shared(mine, s, "oracle_test_accuracy") for s in seeds]),
             "-", "-", "-", "-", "-", "-", "-", "-"]]
    gains = []
    for label in METHODS:
        group = [r for r in mine if r["label"] == label]
        if not group:
            continue
        gain = [r["test_accuracy"] - r["baseline_test_accuracy"] for r in group]
        if "f1" in group[0]:  # ForwardHG's weights are the baseline's by construction
            gains.append((label, gain))
        rows.append([label, mean_sd([r["test_accuracy"] for r in group]), mean_sd(gain),
                     mean_sd([r["final_model_test_accuracy"] for r in group]),
                     scores(group, "f1"), scores(group, "precision"), scores(group, "recall"),
                     f"{np.mean([r['hyper_iterations_done'] for r in group]):.0f}",
                     f"{1000 * np.median([r['seconds_median'] for r in group]):.1f}",
                     f"{np.max([r['peak_mb'] for r in group]):.0f}"])
    return rows, gains


def plot(runs: list, budget: float, path: Any) -> None:
    """Test accuracy of each method's model against time, mean over seeds, one panel per corruption."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(6 * len(CORRUPTIONS), 4.5), squeeze=False)
    grid = np.linspace(0, budget, 200)
    for ax, corruption in zip(axes[0], CORRUPTIONS):
        for label in METHODS:
            group = [r for r in runs if r["corruption"] == corruption and r["label"] == label and r["curve"]]
            if not group:
                continue
            curves = np.array([np.interp(grid, *np.asarray(r["curve"]).T, left=np.nan) for r in group])
            seen = ~np.all(np.isnan(curves), axis=0)  # from the first hyper-iteration of any seed on
            ax.plot(grid[seen], np.nanmean(curves[:, seen], axis=0), label=label)
        mine = [r for r in runs if r["corruption"] == corruption]
        if mine:
            for key, style, name in (("baseline_test_accuracy", ":", "all noisy data"),
                                     ("oracle_test_accuracy", "--", "clean oracle")):
                ax.axhline(np.mean([r[key] for r in mine]), color="k", ls=style, lw=1, label=f"{name} (retrained)")
        ax.set(xlabel="seconds of hyper-iterations", ylabel="test accuracy of the current model",
               title=f"Hyper-cleaning, digits, {corruption:.0%} of the labels corrupted", ylim=(0.5, 1.0))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 s per run")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 5; --quick: 1)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per run (default 12; --quick: 6)")
    parser.add_argument("--worker", nargs=4, metavar=("LABEL", "CORRUPTION", "SEED", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        label, corruption, seed, budget = args.worker
        print(json.dumps(worker(label, float(corruption), int(seed), float(budget))))
        return
    seeds = args.seeds or (1 if args.quick else 5)
    budget = args.budget or (6.0 if args.quick else 12.0)
    if seeds < 1 or budget <= 0:
        sys.exit("bilevel_methods: --seeds must be ≥ 1 and --budget positive.")
    machine = harness.machine_info()
    runs = []
    jobs = [(label, c, s) for c in CORRUPTIONS for s in range(seeds) for label in METHODS]
    for k, (label, corruption, seed) in enumerate(jobs):
        run = harness.run_worker("bilevel_methods", ["--worker", label, str(corruption), str(seed), str(budget)],
                                 label=run_name(label, corruption, seed, budget))
        runs.append(run)
        f1 = f"{run['f1']:.3f}" if "f1" in run else NOT_CLEANING
        print(f"[{k + 1}/{len(jobs)}] {corruption:.0%} seed {seed} {label:27s} test {100 * run['test_accuracy']:.1f} "
              f"(noisy {100 * run['baseline_test_accuracy']:.1f}), F1 {f1}, "
              f"{run['hyper_iterations_done']} iterations", flush=True)
    suffix = "_quick" if args.quick else ""
    header = ["method", "test acc %", "gain vs noisy", "own model %", "F1", "precision", "recall", "iterations",
              "ms/iter", "peak MB"]
    print(f"\nData hyper-cleaning on the bundled digits (800 train / 200 val / 599 test), softmax regression, "
          f"{seeds} seed(s), {budget:g} s of hyper-iterations per run; mean ± sd over seeds, in %.")
    end_load = harness.machine_info()["load_average"][0]
    print(f"load average at start {machine['load_average'][0]:.2f}, at the end {end_load:.2f} (2 cores).")
    tables = {}
    for corruption in CORRUPTIONS:
        rows, gains = summary(runs, corruption)
        tables[corruption] = rows
        print(f"\n{corruption:.0%} of the training labels corrupted\n" + harness.table(header, rows, left=1))
        worse = [label for label, gain in gains if np.mean(gain) <= 0]
        print("every method that learns example weights beats training on all the noisy data" if not worse else
              f"not better than training on all the noisy data: {worse}")
    harness.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = harness.RESULTS_DIR / f"bilevel_methods{suffix}"
    (out.with_suffix(".json")).write_text(json.dumps({"machine": machine, "budget": budget, "seeds": seeds,
                                                      "methods": METHODS, "runs": runs}, indent=1))
    with open(out.with_suffix(".csv"), "w") as f:
        f.write("corruption," + ",".join(header) + "\n")
        for corruption, rows in tables.items():
            f.writelines(f"{corruption:.3f}," + ",".join(f'"{c}"' for c in row) + "\n" for row in rows)
    plot(runs, budget, out.with_suffix(".png"))
    print(f"\nWrote {out}.json, .csv and .png")


if __name__ == "__main__":
    main()
