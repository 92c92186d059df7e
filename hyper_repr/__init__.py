"""Hyper-representation meta-learning (Franceschi et al., ICML 2018, §4): Keras representation
networks as hyperparameters, logistic heads as inner parameters.

    import hyper_repr
    model = hyper_repr.HyperRepresentation(hyper_repr.build_network("omniglot"), ways=5, steps=5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(hyper_repr.data.episode_dataset(...), validation_data=..., steps_per_epoch=500)
"""

import far_ho2.cpu_kernels  # noqa: F401  (first: before the modules load TensorFlow)
from hyper_repr import data, heads  # noqa: E402
from hyper_repr.model import VARIANTS, ConfidenceInterval, HyperRepresentation  # noqa: E402
from hyper_repr.models import build_network  # noqa: E402

__all__ = ["ConfidenceInterval", "HyperRepresentation", "VARIANTS", "build_network",
           "data", "heads"]
