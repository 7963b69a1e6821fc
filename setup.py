from setuptools import find_packages, setup

setup(
    name="rectflow_jax",
    version="0.1.0",
    description="Rectified Flow, reflow and one-step distillation in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["rectflow_jax", "rectflow_jax.*"]),
    install_requires=[
        # Floors for the APIs we call: jax.make_array_from_process_local_data, NamedSharding,
        # mesh_utils, jax.distributed, compiled memory/cost analysis; flax's logical
        # partitioning; optax.tree.norm (0.2.5); PyTreeRestore(partial_restore=) (0.11.14).
        # Tested with jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8.
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.14",
        "ml_collections",
        "etils[epath]",  # rectflow_jax/storage.py: local and gs:// paths (Orbax's own path layer)
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
        # peft: what diffusers' load_lora_weights needs (the LoRA parity reference).
        "test": ["pytest", "pytest-timeout", "torch==2.13.0", "diffusers", "transformers", "peft"],
        # Accelerator builds of jax: pip install -e ".[cuda12]" on GPU hosts, ".[tpu]" on TPU VMs.
        "cuda12": ["jax[cuda12]>=0.7"],
        "tpu": ["jax[tpu]>=0.7"],
    },
    entry_points={"console_scripts": ["rectflow=rectflow_jax.cli:main"]},
)
