"""Logical axis names on weights.

Modules name the logical axes of their weights ('embed', 'mlp', 'heads', 'conv_in', ...); the
trainer maps them to mesh axes with rules from the config (maxtext style). Eager sharding is off:
parameters are placed by `jax.jit(init, out_shardings=...)`, so modules can be built without a mesh.
"""

from __future__ import annotations

from flax import nnx

# Logical axis names used by jaxspeech's layers.
EMBED = "embed"  # model width D
MLP = "mlp"  # feed-forward width
HEADS = "heads"  # q/k/v projection output (heads x head_dim)
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
KERNEL = "kernel"  # convolution taps
VOCAB = "vocab"  # output classes / codewords
NORM = "norm"  # norm scales and biases (replicated by default rules)


def logical(init, *names: str | None):
  """Wraps an initializer so that its Variable carries logical axis names."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def norm_metadata(*names: str | None) -> dict:
  return {"out_sharding": tuple(names), "eager_sharding": False}
