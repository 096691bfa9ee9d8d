"""The train state (born sharded) and the ONE train step shared by every method.

The train state is a plain dict of pytrees, so that jit, shardings, donation and Orbax treat it
uniformly:

    {'step': int32[], 'params': pure dict of the model's nnx.Params,
     'opt_state': {group: optax state} (one per `Method.param_groups` group),
     'model_state': pure dict of the model's other nnx Variables,
     'extra': the method's extra state (EMA teacher, codebooks, k-means targets ...),
     'rng': the run's base PRNG key (constant; step keys are fold_in(rng, step))}

Parameter groups: group g's optimizer sees only the gradient of its own loss (`loss_fn` returns
`{g: loss}`, or one scalar for a single group) with respect to its own parameters, is clipped by
its own norm, and is applied only at steps where `Method.updates_at(step)[g]` is true (else its
parameters and optimizer state are kept exactly). Metrics: one group keeps the plain names
(`loss`, `grad_norm`, `learning_rate`); several add `loss/<g>`, `grad_norm/<g>`,
`learning_rate/<g>`, `updated/<g>`, with `loss` their sum and `grad_norm` the norm of all.

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
from jaxspeech.methods.base import Method, group_optim_config, group_schedule
from jaxspeech.train import optim, partitioning

PyTree = Any


@dataclasses.dataclass
class TrainSetup:
  """Everything static about a run that the step needs, plus the state's shardings."""

  method: Method
  graphdef: Any
  groups: tuple[str, ...]  # parameter groups, in the method's order
  txs: dict[str, optax.GradientTransformation]  # one optimizer per group
  schedules: dict[str, optax.Schedule]
  group_trainable: dict[str, PyTree]  # per group: pure-dict tree of bools (disjoint)
  trainable: PyTree  # union of the groups' masks, same structure as params
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
  pure = nnx.to_pure_dict(abs_params)
  group_trainable = optim.group_masks(pure, method.param_groups(pure), config)
  groups = tuple(group_trainable)
  txs, schedules = {}, {}
  for g in groups:
    group_schedule(config.optim, g)  # validates every / phase now, not at trace time
    txs[g], schedules[g] = optim.make_optimizer(
      group_optim_config(config.optim, g), int(config.train.num_steps), group_trainable[g])
  trainable = jax.tree.map(lambda *ms: any(ms), *group_trainable.values())

  def init_fn(rng):
    params, rest, extra = init_model(rng)
    params = nnx.to_pure_dict(params)
    return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': {g: txs[g].init(params) for g in groups},
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
  return TrainSetup(method=method, graphdef=box['graphdef'], groups=groups, txs=txs,
                    schedules=schedules, group_trainable=group_trainable, trainable=trainable,
                    mesh=mesh, rules=rules, abstract_state=abstract,
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


def _select(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(setup: TrainSetup) -> Callable[[PyTree, dict], tuple[PyTree, dict]]:
  """The shared step: losses -> per-group grads -> optax -> post-update hook; plus norms. Not
  jitted here.

  The method's loss is traced inside `activation_sharding(mesh, rules)`: the encoder's activations
  follow the config's rules (plus `partitioning.ACTIVATION_DEFAULT_RULES`), so GSPMD keeps the
  batch split over ('data', 'fsdp') through the layers instead of guessing."""
  method, graphdef, groups = setup.method, setup.graphdef, setup.groups
  trainable = setup.trainable
  act_rules = partitioning.activation_rules(setup.rules)
  single = len(groups) == 1

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
      losses = loss if isinstance(loss, dict) else {groups[0]: loss}
      if set(losses) != set(groups) or (not single and not isinstance(loss, dict)):
        raise ValueError(f'{type(method).__name__}.loss_fn returned losses for {sorted(losses)}; '
                         f'the parameter groups are {list(groups)}')
      _, _, rest = _split(model)
      return losses, (metrics, extra, nnx.to_pure_dict(rest))

    params = state['params']
    if single:
      # One group: exactly the gradient of its loss (the single-optimizer step of spine v1).
      g = groups[0]
      def scalar_loss(p):
        losses, aux = loss_of(p)
        return losses[g], (losses, aux)
      (_, (losses, (metrics, extra, model_state))), grads = jax.value_and_grad(
        scalar_loss, has_aux=True)(params)
      group_grads = {g: grads}
    else:
      # Group g gets the gradient of its own loss: one vjp, one cotangent per group.
      losses, vjp_fn, (metrics, extra, model_state) = jax.vjp(loss_of, params, has_aux=True)
      group_grads = {}
      for g in groups:
        ct = {h: jnp.ones_like(losses[h]) if h == g else jnp.zeros_like(losses[h])
              for h in groups}
        (grads,) = vjp_fn(ct)
        group_grads[g] = jax.tree.map(
          lambda x, m: x if m else jnp.zeros_like(x), grads, setup.group_trainable[g])
    do_update = method.updates_at(step, groups)
    opt_state = dict(state['opt_state'])
    out_metrics = dict(metrics)
    for g in groups:
      updates, new_opt = setup.txs[g].update(group_grads[g], opt_state[g], params)
      new_params = optax.apply_updates(params, updates)
      if isinstance(do_update[g], bool):  # static: every step (or never)
        if do_update[g]:
          params, opt_state[g] = new_params, new_opt
      else:
        params = _select(do_update[g], new_params, params)
        opt_state[g] = _select(do_update[g], new_opt, opt_state[g])
      if not single:
        out_metrics[f'loss/{g}'] = losses[g].astype(jnp.float32)
        out_metrics[f'grad_norm/{g}'] = _global_norm(group_grads[g], setup.group_trainable[g])
        out_metrics[f'learning_rate/{g}'] = jnp.asarray(setup.schedules[g](step), jnp.float32)
        out_metrics[f'updated/{g}'] = jnp.asarray(do_update[g], jnp.float32)
    params, extra = method.post_update(params, extra, step)
    if single:
      grad_norm = _global_norm(group_grads[groups[0]], trainable)
    else:
      grad_norm = jnp.sqrt(sum(jnp.square(out_metrics[f'grad_norm/{g}']) for g in groups))
    lr = setup.schedules[groups[0]](step)  # several groups: the first's (each is logged too)
    out_metrics.update(
      loss=sum(losses[g] for g in groups).astype(jnp.float32),
      grad_norm=grad_norm,
      param_norm=_global_norm(params),
      learning_rate=jnp.asarray(lr, jnp.float32),
    )
    if 'audio_mask' in batch:
      out_metrics['audio_seconds'] = (jnp.sum(batch['audio_mask'], dtype=jnp.float32)
                                      / SAMPLE_RATE)
    new_state = dict(state, step=step + 1, params=params, opt_state=opt_state,
                     model_state=model_state, extra=extra)
    return new_state, out_metrics

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
