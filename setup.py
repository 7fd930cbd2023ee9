"""lm_align: a JAX framework for language-model training science and alignment."""

import setuptools

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "grain>=0.2.12",
    "ml_collections>=1.0",
    "numpy",
    "tensorboardX",
    "tqdm",
    "matplotlib",
    "rax",  # listwise ranking losses (lm_align.losses.listwise)
    "tokenizers",  # Hugging Face tokenizer.json (lm_align.data.tokenizers.HFTokenizer)
    "safetensors>=0.4",  # Hugging Face checkpoints (lm_align.models.hf)
]
SEQIO = ["seqio", "tensorflow-datasets", "sentencepiece"]
# libtpu, the TPU runtime and compiler, at the version jax's own `tpu` extra pins for the
# installed jax: Cloud TPU VMs run on it (launch/tpu_worker_setup.sh installs `.[tpu]`), and on
# any other host `lm-align compile` compiles for TPU topologies with it.
TPU = ["jax[tpu]"]
TEST = SEQIO + TPU + ["pytest", "pytest-xdist"]  # tests/test_aot.py compiles for TPUs
DOCS = ["mkdocs", "mkdocs-material", "mkdocstrings[python]", "ruff"]  # ruff formats API signatures

setuptools.setup(
    name="lm_align",
    version="0.1.0",
    description="JAX research framework for LM training science and alignment.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["lm_align", "lm_align.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"seqio": SEQIO, "test": TEST, "docs": DOCS, "tpu": TPU},
    entry_points={"console_scripts": ["lm-align=lm_align.cli:main"]},
)
