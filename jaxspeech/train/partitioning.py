"""Mesh construction and logical-axis -> mesh-axis sharding, both driven by config data.

Modules name the *logical* axes of their weights (`nnx.with_partitioning(init, ('embed', 'mlp'))`,
stored as the Param's `out_sharding` / `sharding` metadata). The config maps logical names to mesh
axes (`config.mesh.rules`, a list of `(logical, mesh_axis_or_axes_or_None)` pairs, maxtext-style).
This module turns both into `NamedSharding`s for every leaf of the train state.

Mesh axes are always `('data', 'fsdp', 'model')`; `config.mesh.shape` gives their sizes, one of
which may be -1 (= all remaining devices).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from jaxspeech.errors import ConfigError
from jaxspeech.layers import partitioning as layer_partitioning

MESH_AXES = ('data', 'fsdp', 'model')
# The batch dimension of every input array is split over all data-parallel axes.
BATCH_AXES = ('data', 'fsdp')

# Activation names (jaxspeech/layers/partitioning.py: `constrain(x, 'activation_batch', ...)`)
# -> mesh axes, used when config.mesh.rules names no rule for them: batch over the data-parallel
# axes (as the inputs), feed-forward and attention-head widths over 'model' (Megatron-style
# tensor parallelism, matching the 'mlp' / 'heads' weight rules); time and model width whole.
ACTIVATION_DEFAULT_RULES: dict[str, tuple[str, ...]] = {
  'activation_batch': BATCH_AXES,
  'activation_length': (),
  'activation_embed': (),
  'activation_mlp': ('model',),
  'activation_heads': ('model',),
}


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds a `Mesh` with axes ('data', 'fsdp', 'model') (all `AxisType.Auto`, GSPMD-style)."""
  devices = list(jax.devices() if devices is None else devices)
  shape_cfg = dict(mesh_config.shape)
  unknown = set(shape_cfg) - set(MESH_AXES)
  if unknown:
    raise ConfigError(f'config.mesh.shape has unknown axes {sorted(unknown)}; known: {MESH_AXES}')
  sizes = [int(shape_cfg.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f'config.mesh.shape: at most one axis may be -1, got {shape_cfg}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'config.mesh.shape: sizes must be positive or -1, got {shape_cfg}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f'config.mesh.shape={shape_cfg}: {len(devices)} devices not divisible by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f'config.mesh.shape={shape_cfg} needs {math.prod(sizes)} devices, have {len(devices)}')
  try:
    # Topology-aware device order on TPU/GPU; falls back to a plain reshape (CPU, odd shapes).
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(sizes)
  return jax.sharding.Mesh(
    device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def parse_rules(rules) -> dict[str, tuple[str, ...]]:
  """`[(logical, mesh | [mesh...] | None), ...]` -> {logical: tuple of mesh axes}."""
  out: dict[str, tuple[str, ...]] = {}
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ConfigError(f'config.mesh.rules[{i}] must be a (logical, mesh_axes) pair, got {rule!r}')
    logical, mesh_axes = rule
    if mesh_axes is None:
      axes: tuple[str, ...] = ()
    elif isinstance(mesh_axes, str):
      axes = (mesh_axes,)
    else:
      axes = tuple(mesh_axes)
    for a in axes:
      if a not in MESH_AXES:
        raise ConfigError(f'config.mesh.rules[{i}]: unknown mesh axis {a!r} (known {MESH_AXES})')
    out[str(logical)] = axes
  return out


def activation_rules(rules: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
  """Parsed config rules plus `ACTIVATION_DEFAULT_RULES` for activation names they lack."""
  return {**ACTIVATION_DEFAULT_RULES, **rules}


def logical_to_mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
                         mesh: jax.sharding.Mesh, rules: Mapping[str, tuple[str, ...]],
                         path: str = '') -> PartitionSpec:
  """Maps one leaf's logical axes to a mesh PartitionSpec.

  A mesh axis is used at most once per array, and only if it divides the dimension; otherwise that
  dimension stays replicated on that axis (logged) so that any width runs on any
  mesh — a too-small weight is simply replicated instead of failing.
  """
  if not logical:
    return PartitionSpec()
  if len(logical) != len(shape):
    raise ValueError(f'{path}: logical axes {tuple(logical)} do not match shape {tuple(shape)}')
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical, shape):
    axes: tuple[str, ...] = ()
    for a in rules.get(name, ()) if name else ():
      if a in used or mesh.shape[a] == 1:
        continue
      if dim % (math.prod(mesh.shape[b] for b in axes) * mesh.shape[a]):
        logging.log_first_n(logging.INFO, '%s: dim %d (%s) not divisible by mesh axis %r; '
                            'kept replicated on it', 20, path, dim, name, a)
        continue
      axes += (a,)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


param_logical_axes = layer_partitioning.param_logical_axes  # re-exported (lives with the layers)


def shardings_for(abstract_tree, logical_tree, mesh, rules) -> Any:
  """NamedShardings for `abstract_tree` (ShapeDtypeStructs) given a matching logical-axes tree.

  `logical_tree` may be a prefix-free tree of tuples/None with the same structure; leaves without
  logical names are replicated.
  """
  flat_abs, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
  flat_log = treedef.flatten_up_to(logical_tree) if logical_tree is not None else [None] * len(
    flat_abs)
  out = []
  for (path, leaf), logical in zip(flat_abs, flat_log):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    spec = logical_to_mesh_spec(logical, leaf.shape, mesh, rules, name)
    out.append(NamedSharding(mesh, spec))
  return treedef.unflatten(out)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'); everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
