"""What every launcher shares (``flags.hyper_cleaning``, ``flags.effect_of_T``,
``flags.omniglot``, ``flags.miniimagenet``, and ``hyper_repr.train.meta_train``, their Python
API): one output folder, one set of Keras callbacks, one command line.

- ``workdir``: the run's folder under its lock: config.json (atomic), metrics.csv (rows past
  the last checkpoint dropped on resume: never duplicated), results.json (written only by the
  run that produced them), resume rules (``ConfigMismatchError``), and the clean-up of a failed
  fresh launch (nothing left that blocks the corrected relaunch).
- ``callbacks``: ``Checkpoint`` (every N seconds and on SIGINT/SIGTERM, then ``Interrupted``),
  ``TrainingBudget`` (a hyper-iteration limit and seconds of hyper-iterations, over resumed
  runs), ``tensorboard``, ``ProgressBar``, ``Stagnation`` (a run that makes no progress).
- ``cli``: flags generated from a configuration dataclass (``setting``: a field's help and
  bounds), and one error path (``run``): one line naming the flags, no traceback for user
  errors, divergence or interrupts.
- ``method_flags``: ``--method`` and one flag per setting of every registered method
  (``far_ho2.registry``), with the check that refuses another method's setting.

It lives in the library (not under flags/) because ``hyper_repr.train`` uses it as well as the
launchers, and the library must not import the launchers. Import its modules by name
(``from far_ho2.launch import callbacks, cli, method_flags, workdir``); ``import far_ho2`` does not load them.
"""
