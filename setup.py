from setuptools import find_packages, setup

setup(
    name="rectflow_jax",
    version="0.1.0",
    description="Rectified Flow, reflow and one-step distillation in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["rectflow_jax", "rectflow_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "absl-py",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "importlib_resources",  # tfds prepares datasets through it; newer etils no longer brings it
        "pyarrow",  # parquet prompt files
        "tensorboard",
        "numpy",
        "pillow",
        "matplotlib",
        "tqdm",
        "scikit-learn",
        "safetensors",
        "transformers",  # CLIPTokenizer only; works without torch
    ],
    extras_require={
        # torch==2.13.0 is the CPU wheel on these machines; an unpinned torch pulls CUDA.
        "test": ["pytest", "pytest-timeout", "torch==2.13.0", "diffusers", "transformers"],
    },
    entry_points={"console_scripts": ["rectflow=rectflow_jax.cli:main"]},
)
