"""Hyper-representation meta-learning (Franceschi et al., ICML 2018, §4): Keras representation
networks as hyperparameters, logistic heads as inner parameters."""

import far_ho2.cpu_kernels  # noqa: F401  (first: before the modules load TensorFlow)
