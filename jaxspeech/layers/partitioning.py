"""Logical axis names on weights.

Modules name the logical axes of their weights ('embed', 'mlp', 'heads', 'conv_in', ...); the
trainer maps them to mesh axes with rules from the config (maxtext style). Eager sharding is off:
parameters are placed by `jax.jit(init, out_shardings=...)`, so modules can be built without a mesh.
"""

from __future__ import annotations

import contextlib
import threading

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

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


def param_logical_axes(abstract_params):
  """Pure-dict tree of logical axis tuples (or None) from an `nnx.State` of Params."""

  def axes_of(v):
    if isinstance(v, nnx.Variable):
      md = v.get_metadata()
      ax = md.get("out_sharding") or md.get("sharding") or md.get("sharding_names")
      return tuple(ax) if ax else None
    return None

  return nnx.to_pure_dict(jax.tree.map(
    axes_of, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def norm_metadata(*names: str | None) -> dict:
  return {"out_sharding": tuple(names), "eager_sharding": False}


# Logical names of activation axes (maxtext style); rules map them to mesh axes, e.g.
# ("activation_batch", ("data", "fsdp")). Without an active `activation_sharding` context the
# constraints are no-ops, so the layers run unchanged on one device and inside user code.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_MLP = "activation_mlp"
ACT_HEADS = "activation_heads"

_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules):
  """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`
  (a mapping or list of (logical name, mesh axis | tuple of axes | None))."""
  rules = dict(rules)
  prev = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = (mesh, {k: (v,) if isinstance(v, str) else tuple(v or ()) for k, v in
                          rules.items()})
  try:
    yield
  finally:
    _ACTIVE.value = prev


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """`with_sharding_constraint` by logical axis names; identity outside `activation_sharding`.
  A mesh axis is used at most once and only where its size divides the dimension."""
  active = getattr(_ACTIVE, "value", None)
  if active is None:
    return x
  mesh, rules = active
  used, spec = set(), []
  for dim, name in zip(x.shape, names):
    axes = []
    size = 1
    for a in rules.get(name, ()) if name else ():
      if a in used or a not in mesh.shape or dim % (size * mesh.shape[a]):
        continue
      axes.append(a)
      size *= mesh.shape[a]
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))
