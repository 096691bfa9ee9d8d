"""Pruning methods: PARP revives pruned weights between re-prunes and ends exactly sparse; fixed
masks (MPI / OMP / IMP) never change; the exported model's zero fraction equals the target in
every pruned tensor (+-0.1%); OMP's mask comes from the fine-tuned weights, MPI's from the
initial ones."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.methods.parp import DEFAULT_PATTERN, PruneSpec
from jaxspeech.ops import pruning
from tests.files_snapshot import snapshot
from tests.methods.test_ctc import small_ctc_config

TOL = 1e-3  # the issue's +-0.1%


def _toy_params(seed=0):
  rng = np.random.default_rng(seed)
  return {'a': {'kernel': jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
                'bias': jnp.asarray(rng.normal(size=(16,)), jnp.float32)},
          'b': {'kernel': jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)}}


def _zero_fraction(x):
  return float(np.mean(np.asarray(x) == 0))


def _simulate(spec, num_steps, noise=0.5, seed=1):
  """Runs `post_update` after fake dense updates (none at the pruning step, whose gradient is
  zero). Returns the params, masks and zero fractions of 'a/kernel' after every step."""
  params = _toy_params()
  state = spec.init_state(params)
  post = jax.jit(spec.post_update, static_argnums=3)
  rng = np.random.default_rng(seed)
  history = []
  for step in range(num_steps):
    if step > 0:
      params = jax.tree.map(lambda p: p + noise * jnp.asarray(rng.normal(size=p.shape),
                                                              jnp.float32), params)
    params, state = post(params, state, jnp.asarray(step, jnp.int32), num_steps)
    history.append((jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, state['masks']),
                    _zero_fraction(params['a']['kernel'])))
  return history


def test_parp_revives_between_reprunes_and_ends_exactly_sparse():
  s = 0.7
  spec = PruneSpec('parp', s, every=3, pattern='kernel$')
  hist = _simulate(spec, num_steps=8)
  exact = round(256 * s) / 256
  # Pruned at step 0 (mask of the initial weights), re-pruned after steps 2 and 5, and at the
  # last step 7; in between the pruned weights move away from zero.
  m0 = np.asarray(pruning.magnitude_mask(_toy_params()['a']['kernel'], s))
  np.testing.assert_array_equal(hist[0][1]['a']['kernel'], m0)
  for step, (_, _, z) in enumerate(hist):
    if step in (0, 2, 5, 7):
      assert z == exact, (step, z)
    else:
      assert z < exact - 0.3, (step, z)  # revived (noise makes every weight non-zero)
  # A re-prune keeps some weights the previous mask had pruned (revival reaches the mask).
  assert np.any(hist[2][1]['a']['kernel'] & ~m0)
  final, masks, _ = hist[-1]
  assert _zero_fraction(final['b']['kernel']) == round(70 * s) / 70
  np.testing.assert_array_equal(final['a']['kernel'] != 0, masks['a']['kernel'])
  assert _zero_fraction(final['a']['bias']) == 0.0  # not prunable


@pytest.mark.parametrize('method', ['mpi', 'omp', 'imp'])
def test_fixed_masks_never_change(method):
  s = 0.5
  spec = PruneSpec(method, s, pattern='kernel$')
  hist = _simulate(spec, num_steps=5)
  m0 = np.asarray(pruning.magnitude_mask(_toy_params()['a']['kernel'], s))
  for params, masks, z in hist:
    np.testing.assert_array_equal(masks['a']['kernel'], m0)
    assert z == 0.5
    assert np.all(params['a']['kernel'][~m0] == 0)


def test_gradient_scale_and_forward_masking():
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure = nnx.to_pure_dict(params)
  x = jnp.ones((2, 6))

  def grads(spec, state):
    def f(p):
      m = spec.forward_model(nnx.merge(graphdef, p, rest), state)
      return jnp.sum(m(x) ** 2)
    return nnx.to_pure_dict(jax.grad(f)(params))['kernel']

  for method in ('mpi', 'parp'):
    spec = PruneSpec(method, 0.5, every=1, pattern='kernel$')
    state = spec.init_state(pure)
    assert float(spec.gradient_scale(state)) == 0.0  # the pruning step makes no update
    state = {'masks': spec.masks(pure), 'ready': jnp.ones((), bool)}
    assert float(spec.gradient_scale(state)) == 1.0
    g = np.asarray(grads(spec, state))
    pruned = ~np.asarray(state['masks']['kernel'])
    if method == 'mpi':
      assert np.all(g[pruned] == 0)  # fixed mask: no gradient to pruned weights
    else:
      assert np.all(g[pruned] != 0)  # PARP: pruned weights get gradients and may revive


def test_bad_prune_settings():
  with pytest.raises(ValueError, match='choose one of'):
    PruneSpec('lth', 0.5)
  with pytest.raises(ValueError, match='positive interval'):
    PruneSpec('parp', 0.5, every=0)
  with pytest.raises(ValueError, match='matches no parameter'):
    PruneSpec('mpi', 0.5, pattern='nothing_like_this').init_state(_toy_params())


# ---------------------------------------------------------------------------------------------
# Through the real trainer and the runner (small model, few steps).


def _prunable(tree):
  sel = jax.tree.leaves(pruning.prunable_selection(tree, DEFAULT_PATTERN))
  return [(n, np.asarray(x)) for (n, x), s in zip(pruning.named_leaves(tree), sel) if s]


def _restore_state(workdir, config, step):
  from jaxspeech.prune import _setup
  from jaxspeech.train import checkpoint as ckpt_lib

  _, setup = _setup(config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    return jax.tree.map(np.asarray, ckpt.restore(step, setup.abstract_state))
  finally:
    ckpt.close()


def test_parp_in_trainer_revives_then_ends_exact(tmp_path):
  from jaxspeech.train.trainer import train_and_evaluate

  s = 0.5
  config = small_ctc_config('parp', **{
    'train.num_steps': 5, 'train.checkpoint_every': 1, 'train.keep_checkpoints': 10,
    'prune.sparsity': s, 'prune.every': 2,
    'method.freeze_encoder_steps': 0})  # the transformer must learn from step 1 to revive
  workdir = str(tmp_path / 'parp')
  train_and_evaluate(config, workdir)
  # Prunes after steps 1 (pruning step), 2, 4 and 5 (last); step 3's weights have revived.
  for step, want_exact in ((1, True), (2, True), (3, False), (5, True)):
    state = _restore_state(workdir, config, step)
    tensors = _prunable(state['params'])
    assert len(tensors) == 2 * 6  # 2 layers x (q, k, v, out, intermediate, output)
    for name, x in tensors:
      z = float(np.mean(x == 0))
      if want_exact:
        assert abs(z - s) <= TOL, (step, name, z)
      else:
        assert z < s - 0.05, (step, name, z)
  masks = dict(_prunable(state['extra']['prune']['masks']))
  for name, x in _prunable(state['params']):
    np.testing.assert_array_equal(x != 0, masks[name])


# OMP's run is MPI's runner path plus a second fine-tuning run (60 s vs 20 s on 2 cores): slow,
# to keep the default run under 20 minutes.
@pytest.mark.parametrize('method,s', [pytest.param('omp', 0.7, marks=pytest.mark.slow),
                                      ('mpi', 0.9)])
def test_runner_exports_exact_sparsity_and_the_right_mask(tmp_path, method, s):
  from jaxspeech import prune as prune_runner

  config = small_ctc_config('parp', **{
    'train.num_steps': 3, 'train.checkpoint_every': 3, 'prune.method': method,
    'prune.sparsity': s})
  workdir = str(tmp_path / method)
  prune_runner.run(config, workdir)
  with open(os.path.join(workdir, 'sparsity.json')) as f:
    report = json.load(f)
  assert len(report) == 2 * 6 + 1
  for name, z in report.items():
    assert abs(z - s) <= TOL, (name, z)
  with open(os.path.join(workdir, 'prune_phases.json')) as f:
    assert json.load(f)['fine_tuning_runs'] == (2 if method == 'omp' else 1)
  final = _restore_state(workdir, config, 3)
  masks = dict(_prunable(final['extra']['prune']['masks']))
  # OMP: mask = MP(fine-tuned dense weights); MPI: mask = MP(initial weights).
  src = os.path.join(workdir, 'phases', 'dense' if method == 'omp' else 'init')
  ref = prune_runner.restore_params(src, config)
  ref_masks = dict(_prunable(pruning.magnitude_masks(ref, s, DEFAULT_PATTERN)))
  theta_init = prune_runner.restore_params(os.path.join(workdir, 'phases', 'init'), config)
  for name, x in _prunable(final['params']):
    np.testing.assert_array_equal(masks[name], np.asarray(ref_masks[name]), err_msg=name)
    assert np.all(x[~masks[name]] == 0)
  if method == 'omp':  # the masked run started from m * theta_init (rewinding)
    start = prune_runner.restore_params(os.path.join(workdir, 'phases', 'round1_init'), config)
    for (name, x), (_, x0) in zip(_prunable(start), _prunable(theta_init)):
      np.testing.assert_array_equal(x, np.where(masks[name], x0, 0.0), err_msg=name)
    _rerun_checks_the_recorded_phases(prune_runner, config, workdir)


def _rerun_checks_the_recorded_phases(prune_runner, config, workdir):
  """Issue 22 case 5, on the finished OMP workdir: a re-run with a new sparsity stops with one
  error naming the phase and the key, every file as it was; the same config resumes (nothing
  re-trained, the report unchanged)."""
  before = snapshot(workdir)
  with open(os.path.join(workdir, 'prune_phases.json')) as f:
    phases_json = json.load(f)
  other = copy.deepcopy(config)
  other.prune.sparsity = 0.9
  with pytest.raises(prune_runner.PhaseConfigError) as e:
    prune_runner.run(other, workdir)
  msg = str(e.value)
  assert msg.startswith(os.path.join(workdir, 'phases', 'round1_init') + ':'), msg
  assert 'prune.sparsity: 0.7 -> 0.9' in msg and 'new --workdir' in msg and '\n' not in msg
  assert snapshot(workdir) == before
  out = prune_runner.run(config, workdir)  # identical: every phase is finished, none re-run
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if k not in ('sparsity.json', 'prune_phases.json')} == {
    k: v for k, v in before.items() if k not in ('sparsity.json', 'prune_phases.json')}
  with open(os.path.join(workdir, 'prune_phases.json')) as f:
    assert json.load(f) == phases_json
  assert all(abs(z - 0.7) <= TOL for z in out['sparsity'].values())


def _fake_finished(prune_runner, config, workdir):
  """The records and (empty) checkpoint steps of every phase of a finished run, no training."""
  phases = prune_runner.plan(config, workdir)
  for ph in phases:
    prune_runner.write_record(ph, workdir)
    os.makedirs(os.path.join(ph.workdir, 'checkpoints', '3'))
  return phases


def test_rerun_with_another_config_is_refused_before_any_work(tmp_path):
  """Issue 22 case 5 without training: each phase's record against the requested config. The
  first phase whose recorded config differs is named with its keys; the check runs before any
  phase starts, so nothing on disk changes."""
  from jaxspeech import prune as prune_runner

  config = small_ctc_config('parp', **{
    'train.num_steps': 3, 'train.checkpoint_every': 3, 'prune.method': 'imp',
    'prune.sparsity': 0.75, 'prune.imp_rounds': 2})
  workdir = str(tmp_path / 'imp')
  phases = _fake_finished(prune_runner, config, workdir)
  assert [os.path.relpath(p.workdir, workdir) for p in phases] == [
    'phases/init', 'phases/dense', 'phases/round1_init', 'phases/round1', 'phases/round2_init',
    '.']
  assert [p.sparsity for p in phases] == pytest.approx([0, 0, 0.5, 0.5, 0.75, 0.75])
  prune_runner.check_phases(prune_runner.plan(config, workdir))  # the same config: resumes
  # Keys that cannot change the weights are not compared.
  cadence = copy.deepcopy(config)
  cadence.train.log_every = 1
  cadence.train.checkpoint_every = 1
  prune_runner.check_phases(prune_runner.plan(cadence, workdir))
  before = snapshot(workdir)

  def refused(where, *changes, **overrides):
    c = copy.deepcopy(config)
    for key, value in overrides.items():
      group, leaf = key.split('__')
      c[group][leaf] = value
    with pytest.raises(prune_runner.PhaseConfigError) as e:
      prune_runner.run(c, workdir)
    msg = str(e.value)
    assert msg.startswith(os.path.join(workdir, where) + ':'), msg
    for change in changes:
      assert change in msg, msg
    assert snapshot(workdir) == before
    return msg

  # A new target: the dense phase is the same, round 1's mask is not (s_1 = 1 - 0.1^(1/2)).
  refused('phases/round1_init', 'prune.sparsity: 0.5 -> 0.683', prune__sparsity=0.9)
  # More steps: the dense phase already differs.
  refused('phases/dense', 'train.num_steps: 3 -> 6', train__num_steps=6)
  refused('phases/round1_init', 'prune.rewind: true -> false', prune__rewind=False)
  refused('phases/init', 'train.seed: 0 -> 1', train__seed=1)
  refused('phases/dense', 'optim.learning_rate', optim__learning_rate=1e-2)
  # OMP at the same sparsity: round 1 of 1 is the final run, its start differs.
  msg = refused('phases/round1_init', 'prune.sparsity: 0.5 -> 0.75', prune__method='omp')
  assert 'new --workdir' in msg
  # A phase without a checkpoint has done nothing: its record may change.
  os.rmdir(os.path.join(workdir, 'phases', 'round2_init', 'checkpoints', '3'))
  os.rmdir(os.path.join(workdir, 'checkpoints', '3'))
  prune_runner.check_phases(prune_runner.plan(config, workdir))


def test_rerun_of_a_workdir_without_records_is_refused(tmp_path):
  """A phase with checkpoints but no record (another kind of run, an older runner): its config
  cannot be checked, so the runner does not reuse it."""
  from jaxspeech import prune as prune_runner

  config = small_ctc_config('parp', **{'prune.method': 'mpi', 'prune.sparsity': 0.5})
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '30').mkdir(parents=True)
  with pytest.raises(prune_runner.PhaseConfigError, match='holds checkpoints but no '
                     'prune_phase.json'):
    prune_runner.run(config, str(workdir))
  assert not (workdir / 'phases').exists()


def test_prune_cli_refusal_is_one_line_exit_2(tmp_path):
  """`python -m jaxspeech.prune` on a workdir whose final phase ran at 0.5: asked for 0.7, one
  line and exit 2, no file changed."""
  import subprocess
  import sys

  from experiments import parp
  from jaxspeech import prune as prune_runner

  config = parp.get_config('tiny')
  config.prune.method = 'mpi'
  workdir = str(tmp_path / 'mpi')
  _fake_finished(prune_runner, config, workdir)
  before = snapshot(workdir)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p = subprocess.run([sys.executable, '-m', 'jaxspeech.prune', '--config',
                      'experiments/parp.py:tiny', '--workdir', workdir,
                      '--config.prune.method=mpi', '--config.prune.sparsity=0.7'],
                     cwd=root, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 2, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr
  lines = [line for line in p.stderr.splitlines() if 'error:' in line]
  assert len(lines) == 1 and lines[0].startswith(f'python -m jaxspeech.prune: error: {workdir}:')
  assert 'prune.sparsity: 0.5 -> 0.7' in lines[0]
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_runner_imp_rounds(tmp_path):
  from jaxspeech import prune as prune_runner

  config = small_ctc_config('parp', **{
    'train.num_steps': 3, 'train.checkpoint_every': 3, 'prune.method': 'imp',
    'prune.sparsity': 0.75, 'prune.imp_rounds': 2})
  workdir = str(tmp_path / 'imp')
  out = prune_runner.run(config, workdir)
  assert [p['sparsity'] for p in out['phases']] == pytest.approx([0.0, 0.5, 0.75])
  for z in out['sparsity'].values():
    assert abs(z - 0.75) <= TOL
  # Round 2's mask contains round 1's pruned set (iterative: pruned weights stay pruned).
  r1 = prune_runner.restore_params(os.path.join(workdir, 'phases', 'round1'), config)
  final = prune_runner.restore_params(workdir, config)
  for (name, a), (_, b) in zip(_prunable(r1), _prunable(final)):
    assert np.all(b[a == 0] == 0), name
