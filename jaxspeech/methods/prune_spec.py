"""Magnitude pruning inside one fine-tuning run: PARP and the fixed-mask baselines (SEEDS §4).

`config.prune.method`:
  none  dense fine-tuning.
  parp  Prune-Adjust-Re-Prune (Lai et al., NeurIPS 2021): m = MP(theta_0, s), theta = m * theta_0;
        fine-tune ALL weights (pruned ones start at zero but get gradients and may revive);
        every `prune.every` updates m = MP(theta, s), theta <- m * theta; the last update ends with
        a re-prune, so the returned model is m * theta, exactly sparse.
  mpi   magnitude pruning at initialisation: m = MP(theta_0, s) from the run's initial (pretrained)
        weights, then fine-tuning with m fixed.
  omp / imp  within ONE run these are the fixed-mask fine-tuning phase, exactly like mpi: the mask
        is MP of the run's initial parameters. Their other phases (dense fine-tuning, pruning the
        fine-tuned weights, rewinding the survivors to the pretrained values) need several runs
        and are orchestrated by `jaxspeech.prune`, which starts the masked phase
        from m * theta_init; MP of that recovers m (its zeros are the smallest magnitudes).

Fixed masks are enforced twice: the forward pass uses m * theta (so pruned weights get no
gradient) and `post_update` re-applies m after every update (so AdamW's weight decay or moments
can never move them). Masks live in the extra state (`{'masks', 'ready'}`), are checkpointed and
exported with the parameters.

The pruning step: the first step of a pruned run (`ready` False) computes the loss but makes no
update (its gradient is scaled by 0: Adam's moments stay 0 and its update is exactly 0; AdamW's
decoupled weight decay at that step scales each tensor uniformly, which leaves the magnitude
order, hence the mask, unchanged); `post_update` then sets m = MP(theta_0, s) and
theta = m * theta_0. So the first real update is taken from the pruned model, as PARP specifies.

`MP` is `jaxspeech.ops.pruning.magnitude_masks`: exact sparsity round(P * s) per tensor (or over
all prunable tensors with `prune.scope='global'`), ties broken by index. Prunable tensors are the
paths matching `prune.pattern` (default: the transformer's attention and feed-forward kernels,
PARP's "transformer weights"; the conv feature extractor is frozen and not pruned).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxspeech.errors import ConfigError
from jaxspeech.ops import pruning

PyTree = Any

METHODS = ('none', 'omp', 'imp', 'mpi', 'parp')
FIXED_MASK = ('omp', 'imp', 'mpi')
# Attention q/k/v/out and feed-forward kernels of every transformer block of a model whose
# SpeechEncoder sits at `encoder` (paths as in `jaxspeech.train.optim.param_paths`).
DEFAULT_PATTERN = r'^encoder/encoder/layers/\d+/(attention|feed_forward)/[^/]+/kernel$'


def prune_config(method: str = 'none', sparsity: float = 0.5, every: int = 50,
                 pattern: str = DEFAULT_PATTERN, scope: str = 'per_tensor',
                 imp_rounds: int = 2, rewind: bool = True) -> ml_collections.ConfigDict:
  """`config.prune` for an experiment (see the module docstring)."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.sparsity = float(sparsity)  # fraction of each prunable tensor set to zero
  c.every = int(every)  # PARP: re-prune every this many updates
  c.pattern = pattern  # regex (re.search) over '/'-joined parameter paths
  c.scope = scope  # per_tensor | global
  # prune_runner (multi-run methods): IMP prunes in `imp_rounds` steps of equal keep ratio
  # (sparsity 1 - (1 - s)^(k / R) after round k); OMP/IMP rewind the surviving weights to the
  # initial (pretrained) values before the masked fine-tuning (lottery-ticket rewinding) when
  # `rewind`, else continue from the fine-tuned ones.
  c.imp_rounds = int(imp_rounds)
  c.rewind = bool(rewind)
  return c


@dataclasses.dataclass(frozen=True)
class PruneSpec:
  """The static pruning settings of a run and its jit-able hooks."""

  method: str = 'none'
  sparsity: float = 0.0
  every: int = 0
  pattern: str = DEFAULT_PATTERN
  scope: str = 'per_tensor'

  def __post_init__(self):
    if self.method not in METHODS:
      raise ConfigError(f'config.prune.method={self.method!r}: choose one of {METHODS}')
    if self.method != 'none' and not 0.0 <= self.sparsity < 1.0:
      raise ConfigError(f'config.prune.sparsity={self.sparsity}: must be in [0, 1)')
    if self.method == 'parp' and self.every < 1:
      raise ConfigError(f'config.prune.every={self.every}: PARP needs a positive interval')
    if self.scope not in ('per_tensor', 'global'):
      raise ConfigError(f'config.prune.scope={self.scope!r}: per_tensor or global')

  @classmethod
  def from_config(cls, config) -> PruneSpec:
    if 'prune' not in config:
      return cls()
    p = config.prune
    return cls(method=str(p.method), sparsity=float(p.sparsity), every=int(p.every),
               pattern=str(p.pattern), scope=str(p.scope))

  @property
  def enabled(self) -> bool:
    return self.method != 'none'

  def masks(self, params: PyTree) -> PyTree:
    """MP(params, s): bool keep-masks for prunable leaves, scalar True elsewhere."""
    return pruning.magnitude_masks(params, self.sparsity, self.pattern, self.scope)

  def init_state(self, params: PyTree) -> dict:
    """All-kept masks (replaced at the pruning step) and `ready` False; {} when not pruning."""
    if not self.enabled:
      return {}
    sel = pruning.prunable_selection(params, self.pattern)
    if not any(jax.tree.leaves(sel)):
      paths = [n for n, _ in pruning.named_leaves(params)][:4]
      raise ConfigError(f'config.prune.pattern={self.pattern!r} matches no parameter; paths '
                        f'look like {paths}')
    masks = jax.tree.map(lambda x, s: jnp.ones(jnp.shape(x), bool) if s else jnp.ones((), bool),
                         params, sel)
    return {'masks': masks, 'ready': jnp.zeros((), bool)}

  def gradient_scale(self, state: dict) -> jax.Array:
    """0 at the pruning step of a pruned run, else 1."""
    if not self.enabled:
      return jnp.ones((), jnp.float32)
    return state['ready'].astype(jnp.float32)

  def forward_model(self, model: nnx.Module, state: dict) -> nnx.Module:
    """The model the loss sees: m * theta for fixed masks (no gradient to pruned weights);
    theta itself for PARP (pruned weights revive) and dense runs."""
    if self.method not in FIXED_MASK:
      return model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masked = pruning.apply_masks(nnx.to_pure_dict(params), state['masks'])
    nnx.replace_by_pure_dict(params, masked)
    return nnx.merge(graphdef, params, rest)

  def post_update(self, params: PyTree, state: dict, step: jax.Array,
                  num_steps: int) -> tuple[PyTree, dict]:
    """After the optimizer update of `step` (0-based): prune at the pruning step, re-prune
    (PARP), keep fixed masks applied."""
    if not self.enabled:
      return params, state
    ready = state['ready']
    if self.method == 'parp':
      last = step + 1 >= num_steps
      due = jnp.logical_or((step + 1) % self.every == 0, last)
      prune_now = jnp.logical_or(~ready, due)
    else:
      prune_now = ~ready

    def prune(p):
      m = self.masks(p)
      return pruning.apply_masks(p, m), m

    params, masks = jax.lax.cond(prune_now, prune, lambda p: (p, state['masks']), params)
    if self.method in FIXED_MASK:
      params = pruning.apply_masks(params, masks)
    return params, {'masks': masks, 'ready': jnp.ones((), bool)}
