"""lm_align: Flax models, optax optimizers and sharded train steps for
language-model training science and alignment."""

__version__ = "0.1.0"
