"""far_ho2: gradient-based bilevel optimization in TensorFlow 2 / Keras (a TF2 port of FAR-HO).

TensorFlow comes from an extra, so that CPU machines do not download the CUDA-enabled wheel:
    pip install ".[cpu]"   # tensorflow-cpu
    pip install ".[gpu]"   # tensorflow[and-cuda]
    pip install ".[tfds]"  # TensorFlow Datasets as a data source of the launchers (docs/data.md)
Others: ".[test]" (pytest, and the docs' and TFDS's packages), ".[docs]" (mkdocs), ".[bench]"
(JAX), ".[tensorboard]" (to view the launchers' TensorBoard logs).
"""

from setuptools import find_packages, setup

TENSORFLOW = "2.21.*"
# The documentation site (mkdocs.yml): in `test` too, since tests/test_docs.py builds it.
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"]
# TensorFlow Datasets as a data source (hyper_repr.data.tfds_source); importlib_resources: etils needs it
TFDS = ["tensorflow-datasets>=4.9", "importlib_resources"]

setup(
    name="far_ho2",
    version="0.1.0",
    description="Gradient-based hyperparameter optimization and meta-learning (FAR-HO) for TensorFlow 2 / Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["far_ho2", "far_ho2.*", "hyper_repr", "hyper_repr.*"]),
    install_requires=[
        "keras>=3.10",
        "numpy>=1.26",
        "absl-py>=2.0",
        "h5py>=3.10",
        "matplotlib>=3.8",
    ],
    extras_require={
        "cpu": [f"tensorflow-cpu=={TENSORFLOW}"],
        "gpu": [f"tensorflow[and-cuda]=={TENSORFLOW}"],
        "test": ["pytest>=8", "pytest-xdist>=3", *DOCS, *TFDS],
        "docs": DOCS,
        "tfds": TFDS,
        "bench": ["jax>=0.4"],
        "tensorboard": ["tensorboard>=2.20"],  # to view the launchers' logs (TensorFlow writes them)
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
