"""Ahead-of-time compile of the real train step for a mesh this machine may not have.

`compile_train_step(config, mesh)` lowers and compiles the very step training runs
(`step.jit_train_step`) against abstract inputs (`ShapeDtypeStruct`s carrying their shardings):
nothing is allocated, so a 64-device fsdp x model mesh of fake CPU devices compiles on a laptop
and tells, before a pod is booked, that the shardings are consistent and how many bytes each
device needs (`compiled.memory_analysis()`).

`sharded_bytes(tree)` is the per-device footprint the shardings imply (one shard of every leaf),
to check `memory_analysis()` against and to see what fsdp saves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxspeech.errors import ConfigError
from jaxspeech.methods.base import get_method
from jaxspeech.train import partitioning
from jaxspeech.train import step as step_lib

PyTree = Any
MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                 'temp_size_in_bytes', 'generated_code_size_in_bytes')


@dataclasses.dataclass
class CompiledStep:
  setup: step_lib.TrainSetup
  batch: dict  # abstract batch (ShapeDtypeStructs with shardings)
  lowered: Any  # jax.stages.Lowered (StableHLO with the sharding annotations)
  compiled: Any  # jax.stages.Compiled
  memory: dict[str, int]  # memory_analysis() fields, bytes per device


def abstract_batch(config, mesh: jax.sharding.Mesh, extra_fields: tuple[str, ...] = (),
                   method=None, num_samples: int | None = None) -> dict:
  """The step's batch as ShapeDtypeStructs with their shardings: the method's `batch_spec` (for
  the bucket `num_samples`, default the longest) plus float32 `extra_fields` shaped like `audio`
  (e.g. a perturbed view the config does not declare)."""
  method = method or get_method(config)
  spec = method.batch_spec(config, num_samples)
  b = int(config.data.batch_size)
  shards = math.prod(mesh.shape[a] for a in partitioning.BATCH_AXES)
  if b % shards:
    raise ConfigError(f'config.data.batch_size={b} not divisible by the {shards} batch shards '
                      f'of the mesh {dict(mesh.shape)}')
  for k in extra_fields:
    if k not in spec:
      spec[k] = jax.ShapeDtypeStruct(spec['audio'].shape, jnp.float32)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                  sharding=partitioning.batch_sharding(mesh, len(v.shape)))
          for k, v in spec.items()}


def compile_train_step(config, mesh: jax.sharding.Mesh, extra_fields: tuple[str, ...] = (),
                       num_samples: int | None = None) -> CompiledStep:
  """Lowers and compiles the real step on the method's declared batch (one bucket length:
  `num_samples`, default the longest of `config.data.bucket_lengths` / `num_samples`)."""
  method = get_method(config)
  setup = step_lib.build_setup(config, method, mesh)
  batch = abstract_batch(config, mesh, extra_fields, method=method, num_samples=num_samples)
  lowered = step_lib.jit_train_step(setup, batch).lower(setup.abstract_state, batch)
  compiled = lowered.compile()
  mem = compiled.memory_analysis()
  memory = {k: int(getattr(mem, k)) for k in MEMORY_FIELDS if mem is not None and hasattr(mem, k)}
  return CompiledStep(setup=setup, batch=batch, lowered=lowered, compiled=compiled, memory=memory)


def sharded_bytes(tree: PyTree) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs or Arrays with shardings).

  Assumes evenly divided shards, which `partitioning.logical_to_mesh_spec` guarantees."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape)
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def total_bytes(tree: PyTree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
