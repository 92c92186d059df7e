"""Hyper-representation on the bundled Omniglot images (the README's table), until the
`flags/omniglot.py` launcher exists.

Meta-trains the Omniglot network 5-way 1-shot (T = 5 head steps, learned inner learning rate,
meta-batch 4) within a CPU time budget, early-stopping on validation accuracy (alphabet
Early_Aramaic), then evaluates 600 fixed test episodes 5-way 1-shot and 5-shot on the alphabets
Sanskrit and Tagalog, next to logistic regression on pixels and the untrained network. Outputs
(config, metrics.csv, checkpoints, results.json) go to WORKDIR; running again resumes.

    python examples/omniglot_hyper_representation.py WORKDIR [--budget_seconds 780]
"""

import argparse
import pathlib

from absl import logging

from hyper_repr import data, train

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "omniglot"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--budget_seconds", type=float, default=780.0)
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)
    splits = data.load_omniglot(DATA, test_alphabets=["Sanskrit", "Tagalog"], val_alphabets=["Early_Aramaic"])
    config = train.Config(steps=5, learning_rate=0.1, learn_lr=True, meta_batch_size=4, iterations=100000,
                          eval_every=250, eval_episodes=200, test_episodes=600, test_shots=(1, 5),
                          patience=20, time_budget_seconds=args.budget_seconds)
    print(train.meta_train(config, args.workdir, splits))


if __name__ == "__main__":
    main()
