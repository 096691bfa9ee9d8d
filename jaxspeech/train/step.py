"""The train state (born sharded) and the ONE train step shared by every method.

The train state is a plain dict of pytrees, so that jit, shardings, donation and Orbax treat it
uniformly:

    {'step': int32[], 'params': pure dict of the model's nnx.Params,
     'opt_state': optax state, 'model_state': pure dict of the model's other nnx Variables,
     'extra': the method's extra state (EMA teacher, codebooks, k-means targets ...),
     'rng': the run's base PRNG key (constant; step keys are fold_in(rng, step))}

Keys per step are `fold_in(rng, step)`, so a resumed run draws exactly the random numbers of an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxspeech.audio import SAMPLE_RATE
from jaxspeech.layers.partitioning import activation_sharding
from jaxspeech.methods.base import Method
from jaxspeech.train import optim, partitioning

PyTree = Any


@dataclasses.dataclass
class TrainSetup:
  """Everything static about a run that the step needs, plus the state's shardings."""

  method: Method
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  trainable: PyTree  # pure-dict tree of bools, same structure as params
  mesh: jax.sharding.Mesh
  rules: dict
  abstract_state: PyTree  # ShapeDtypeStructs carrying shardings
  state_shardings: PyTree
  init_fn: Callable[[jax.Array], PyTree]  # rng -> state (unsharded function; jit it to place)


def _split(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def build_setup(config, method: Method, mesh: jax.sharding.Mesh) -> TrainSetup:
  """Shapes, logical axes and shardings of the whole train state, without allocating it."""
  box: dict[str, Any] = {}
  rules = partitioning.parse_rules(config.mesh.rules)

  def init_model(rng):
    model, extra = method.init(rng)
    graphdef, params, rest = _split(model)
    box['graphdef'] = graphdef
    return params, rest, extra

  seed_key = jax.random.key_data(jax.random.key(0))
  abs_params, _, abs_extra = jax.eval_shape(init_model, seed_key)
  param_axes = partitioning.param_logical_axes(abs_params)
  trainable = optim.trainable_mask(nnx.to_pure_dict(abs_params), config.train.trainable)
  tx, schedule = optim.make_optimizer(config.optim, int(config.train.num_steps), trainable)

  def init_fn(rng):
    params, rest, extra = init_model(rng)
    params = nnx.to_pure_dict(params)
    return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': tx.init(params),
      'model_state': nnx.to_pure_dict(rest),
      'extra': extra,
      'rng': rng,
    }

  abstract = jax.eval_shape(init_fn, seed_key)
  repl = partitioning.replicated(mesh)
  param_sh = partitioning.shardings_for(abstract['params'], param_axes, mesh, rules)
  opt_sh = _mirror_param_shardings(abstract['opt_state'], abstract['params'], param_sh, repl)
  extra_axes = method.extra_state_logical_axes(abs_extra)
  shardings = {
    'step': repl,
    'params': param_sh,
    'opt_state': opt_sh,
    'model_state': jax.tree.map(lambda _: repl, abstract['model_state']),
    'extra': partitioning.shardings_for(abstract['extra'], extra_axes, mesh, rules),
    'rng': repl,
  }
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return TrainSetup(method=method, graphdef=box['graphdef'], tx=tx, schedule=schedule,
                    trainable=trainable, mesh=mesh, rules=rules, abstract_state=abstract,
                    state_shardings=shardings, init_fn=init_fn)


def _mirror_param_shardings(opt_state, params, param_sh, default):
  """Optimizer-state leaves whose key path ends with a parameter's path (and have its shape) get
  that parameter's sharding (Adam's mu/nu, also inside multi_transform / masked states); other
  leaves (step counts) get `default`."""
  by_path = {}
  for (path, p), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                           jax.tree.leaves(param_sh)):
    by_path[tuple(path)] = (p.shape, sh)
  depth = max((len(k) for k in by_path), default=0)

  def pick(path, leaf):
    for k in range(min(depth, len(path)), 0, -1):
      hit = by_path.get(tuple(path[-k:]))
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def create_train_state(setup: TrainSetup, rng: jax.Array) -> PyTree:
  """Parameters and optimizer state created directly in their shardings (never whole on one
  device): `jax.jit(init, out_shardings=...)`."""
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(rng)


def _global_norm(tree, mask=None) -> jax.Array:
  leaves = jax.tree.leaves(tree if mask is None else jax.tree.map(
    lambda x, m: x if m else jnp.zeros((), x.dtype), tree, mask))
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def make_train_step(setup: TrainSetup) -> Callable[[PyTree, dict], tuple[PyTree, dict]]:
  """The shared step: loss -> grads -> optax -> post-update hook; plus norms. Not jitted here.

  The method's loss is traced inside `activation_sharding(mesh, rules)`: the encoder's activations
  follow the config's rules (plus `partitioning.ACTIVATION_DEFAULT_RULES`), so GSPMD keeps the
  batch split over ('data', 'fsdp') through the layers instead of guessing."""
  method, graphdef, tx, trainable = setup.method, setup.graphdef, setup.tx, setup.trainable
  act_rules = partitioning.activation_rules(setup.rules)

  def train_step(state: PyTree, batch: dict[str, jax.Array]) -> tuple[PyTree, dict]:
    step = state['step']
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)

    def loss_of(params):
      # Frozen parameters are constants to autodiff, so XLA prunes their weight gradients.
      params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
      model = nnx.merge(graphdef, params, state['model_state'])
      # Layers pin their activations by logical names (`constrain`) while this traces.
      with activation_sharding(setup.mesh, act_rules):
        loss, (metrics, extra) = method.loss_fn(model, state['extra'], batch, rng)
      _, _, rest = _split(model)
      return loss, (metrics, extra, nnx.to_pure_dict(rest))

    (loss, (metrics, extra, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
      state['params'])
    grad_norm = _global_norm(grads, trainable)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    params, extra = method.post_update(params, extra, step)
    metrics = dict(metrics)
    metrics.update(
      loss=loss.astype(jnp.float32),
      grad_norm=grad_norm,
      param_norm=_global_norm(params),
      learning_rate=jnp.asarray(setup.schedule(step), jnp.float32),
      audio_seconds=jnp.sum(batch["audio_mask"], dtype=jnp.float32) / SAMPLE_RATE,
    )
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state,
                     model_state=model_state, extra=extra)
    return new_state, metrics

  return train_step


def batch_shardings(setup: TrainSetup, batch_like: dict) -> dict:
  return {k: partitioning.batch_sharding(setup.mesh, v.ndim) for k, v in batch_like.items()}


def jit_train_step(setup: TrainSetup, batch_like: dict):
  """`jax.jit` of the shared step with explicit in/out shardings and the state donated."""
  repl = partitioning.replicated(setup.mesh)
  return jax.jit(
    make_train_step(setup),
    in_shardings=(setup.state_shardings, batch_shardings(setup, batch_like)),
    out_shardings=(setup.state_shardings, repl),
    donate_argnums=(0,),
  )
