"""HiFi-GAN vocoder through the Method contract: the loss terms' values, padding and filler rows
masked out, each parameter group moved by its own loss only (with the warm-up holding the
discriminators), and a few steps through the real trainer ending in a workdir that vocodes."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


def small_config(**overrides):
  """experiments/vocoder.py:tiny with a very small model, 2048-sample crops, batch 2, on the
  400-utterance built-in corpus (the one the rest of the suite uses)."""
  from experiments import vocoder

  c = vocoder.get_config('tiny')
  settings = {
    'data.builtin_utterances': 400, 'data.batch_size': 2, 'data.num_samples': 2048,
    'method.channels': 16, 'method.resblock_kernels': (3,), 'method.resblock_dilations': ((1, 3),),
    'method.mpd_channels': (4, 4, 4, 4, 4), 'method.msd_channels': (4,) * 7,
    'method.msd_kernels': (5, 5, 5, 5, 5, 5, 3), 'method.adv_start_step': 2,
    'train.num_steps': 5, 'train.log_every': 1, 'train.checkpoint_every': 0,
    'train.async_checkpointing': False, **overrides}
  for key, value in settings.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _random_batch(method, config, seed=0):
  spec = method.batch_spec(config)
  b, s = spec['audio'].shape
  rng = np.random.default_rng(seed)
  t = np.arange(s) / 16000
  audio = 0.5 * np.sin(2 * np.pi * rng.uniform(100, 400, (b, 1)) * t) + 0.05 * rng.standard_normal(
    (b, s))
  batch = {k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}
  batch.update(audio=audio.astype(np.float32), audio_mask=np.ones((b, s), bool),
               valid=np.ones((b,), bool), index=np.arange(b, dtype=np.int32))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_loss_terms_have_their_known_values():
  from jaxspeech.ops import vocoder_losses as v

  w = jnp.array([1.0, 1.0, 0.0])
  ones, zeros = jnp.ones((3, 5)), jnp.zeros((3, 5))
  garbage = jnp.array([[0.0] * 5, [0.0] * 5, [7.0] * 5])  # only in the zero-weight row
  assert float(v.lsgan_discriminator_loss([ones, ones + garbage], [zeros, zeros], w)) == 0.0
  assert float(v.lsgan_discriminator_loss([zeros], [ones], w)) == 2.0
  assert float(v.lsgan_generator_loss([ones, ones - garbage], w)) == 0.0
  assert float(v.lsgan_generator_loss([zeros], w)) == 1.0
  fm_r = [[ones, zeros], [ones]]
  assert float(v.feature_matching_loss(fm_r, fm_r, w)) == 0.0
  assert float(v.feature_matching_loss(fm_r, [[zeros, ones], [ones + garbage]], w)) == 2.0
  np.testing.assert_array_equal(
    v.frame_mask(jnp.array([2048, 1000, 0]), 9, 256).sum(1), [9, 4, 1])  # 1 + length // hop
  # MR-STFT: zero for identical signals; fake = real / 2 gives spectral convergence 1/2 and
  # log-magnitude L1 log 2 at every resolution.
  real = jax.random.normal(jax.random.key(0), (2, 4096))
  lengths, w2 = jnp.array([4096, 4096]), jnp.ones(2)
  sc, mag = v.multi_resolution_stft_loss(real, real, lengths, w2)
  assert float(sc) == 0.0 and float(mag) == 0.0
  sc, mag = v.multi_resolution_stft_loss(real, real / 2, lengths, w2)
  np.testing.assert_allclose([float(sc), float(mag)], [0.5, np.log(2.0)], rtol=1e-4)


def test_padding_and_filler_rows_do_not_change_the_losses():
  from jaxspeech.methods.base import get_method

  config = small_config(**{'data.batch_size': 3, 'method.adv_start_step': 0})
  method = get_method(config)
  model, extra = method.init(jax.random.key(0))
  batch = _random_batch(method, config)
  mask = np.ones((3, 2048), bool)
  mask[1, 1300:] = False  # a short utterance
  batch['audio_mask'] = jnp.asarray(mask)
  batch['valid'] = jnp.array([True, True, False])  # a filler row

  @jax.jit
  def losses(batch):
    (loss, (metrics, _)) = method.loss_fn(model, extra, batch, jax.random.key(1))
    return {**loss, **metrics}

  base = losses(batch)
  noisy = dict(batch, audio=jnp.where(jnp.asarray(mask), batch['audio'], 3.0)
               .at[2].set(-1.0))  # padding samples and the filler row changed
  other = losses(noisy)
  for k in base:
    np.testing.assert_allclose(float(other[k]), float(base[k]), rtol=1e-6, err_msg=k)
  assert all(np.isfinite(float(x)) for x in base.values())
  # The short row's real samples do count (the check above is not vacuous).
  changed = losses(dict(batch, audio=batch['audio'].at[1, :1000].multiply(0.5)))
  assert abs(float(changed['mel_l1']) - float(base['mel_l1'])) > 1e-3


def test_each_group_moves_by_its_own_loss_and_the_discriminator_waits_for_the_warm_up():
  """SGD, lr 1, no clipping: each group's update must be minus the gradient of its own loss
  with respect to itself; before `adv_start_step` the discriminators stay bit-for-bit and the
  generator's loss has no adversarial term."""
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  sgd = dict(name='sgd', learning_rate=1.0, schedule='constant', weight_decay=0.0, clip_norm=0.0)
  config = small_config(**{f'optim.{g}.{k}': x for g in ('generator', 'discriminator')
                           for k, x in sgd.items()}, **{'method.adv_start_step': 1})
  method = get_method(config)
  setup = step_lib.build_setup(config, method, partitioning.create_mesh(config.mesh))
  state = step_lib.create_train_state(setup, jax.random.key(0))
  batch = _random_batch(method, config)

  @jax.jit
  def grads(state):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])

    def group_loss(params, group):
      model = nnx.merge(setup.graphdef, params, state['model_state'])
      return method.loss_fn(model, state['extra'], batch, rng)[0][group]
    return {g: jax.grad(group_loss)(state['params'], g) for g in setup.groups}

  step = jax.jit(step_lib.make_train_step(setup))
  snap = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
  for i in range(2):
    before, g = snap(state['params']), snap(grads(state))
    state, metrics = step(state, batch)
    after = snap(state['params'])
    assert float(metrics['updated/discriminator']) == float(i >= 1)
    assert float(metrics['updated/generator']) == 1.0
    for a, b, d in zip(jax.tree.leaves(after['generator']), jax.tree.leaves(before['generator']),
                       jax.tree.leaves(g['generator']['generator'])):
      np.testing.assert_allclose(a - b, -d, rtol=1e-4, atol=1e-6)
    d_moved = [a - b for a, b in zip(jax.tree.leaves(after['discriminator']),
                                     jax.tree.leaves(before['discriminator']))]
    if i == 0:  # warm-up: discriminators untouched, no adversarial gradient into G
      assert all(np.all(x == 0) for x in d_moved)
      assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g['generator']['discriminator'])) \
        == 0.0
    else:
      for x, d in zip(d_moved, jax.tree.leaves(g['discriminator']['discriminator'])):
        np.testing.assert_allclose(x, -d, rtol=1e-4, atol=1e-6)
      # The generator's loss does reach the discriminators' weights; a leak would show above.
      assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g['generator']['discriminator'])) \
        > 1e-4
      assert float(metrics['g_adv']) > 0 and float(metrics['fm']) > 0


def test_a_few_steps_through_the_trainer_then_vocode_from_the_workdir(tmp_path):
  from jaxspeech.train import checkpoint as ckpt_lib
  from jaxspeech.train import trainer

  config = small_config()
  wd = str(tmp_path / 'vocoder')
  trainer.train_and_evaluate(config, wd)
  rows = [json.loads(line) for line in open(os.path.join(wd, 'metrics.jsonl'))]
  train = [r for r in rows if 'd_loss' in r]
  assert [r['step'] for r in train] == [1, 2, 3, 4, 5]
  for r in train:
    for k in ('d_loss', 'g_adv', 'fm', 'mel_l1', 'mrstft', 'loss'):
      assert np.isfinite(r[k]), (r['step'], k)
  # Warm-up (adv_start_step = 2): the discriminators update from step 3 on.
  assert [r['updated/discriminator'] for r in train] == [0, 0, 1, 1, 1]
  method, model, _, _ = ckpt_lib.load_workdir_model(wd)
  vocode = jax.jit(method.predict_fns(model, None)['vocode'])
  wav = vocode(jnp.full((2, 5, 80), -5.0))
  assert wav.shape == (2, 5 * 256) and wav.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(wav)))


def test_mel_l1_falls_on_a_fixed_batch():
  """The reconstruction terms train the generator: 12 warm-up steps (AdamW 2e-3) on one batch of
  tones more than halve its mel L1 (random crops of the corpus are too noisy to show it in a few
  steps)."""
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  config = small_config(**{'optim.generator.learning_rate': 2e-3, 'method.adv_start_step': 100})
  method = get_method(config)
  setup = step_lib.build_setup(config, method, partitioning.create_mesh(config.mesh))
  state = step_lib.create_train_state(setup, jax.random.key(0))
  batch = _random_batch(method, config)
  step = jax.jit(step_lib.make_train_step(setup))
  mel_l1 = []
  for _ in range(12):
    state, metrics = step(state, batch)
    mel_l1.append(float(metrics['mel_l1']))
  assert mel_l1[-1] < 0.5 * mel_l1[0], mel_l1


def test_upsampling_must_match_the_mel_hop():
  from jaxspeech.methods.base import get_method

  with pytest.raises(ValueError, match='multiply to 128'):
    get_method(small_config(**{'method.upsample_rates': (8, 4, 4)}))


def test_one_shot_generator_pruning_keeps_exact_sparsity(tmp_path):
  from flax import nnx

  from experiments.vocoder import GENERATOR_PRUNE_PATTERN
  from jaxspeech.ops import pruning
  from jaxspeech.train import checkpoint as ckpt_lib
  from jaxspeech.train import trainer

  config = small_config()
  config.prune.method = 'mpi'
  config.prune.sparsity = 0.6
  wd = str(tmp_path / 'pruned')
  trainer.train_and_evaluate(config, wd)
  _, model, _, _ = ckpt_lib.load_workdir_model(wd)
  named = dict(pruning.named_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  gen = [n for n in named if re.search(GENERATOR_PRUNE_PATTERN, n)]
  assert gen and all(n.startswith('generator/') for n in gen)
  for n in gen:  # after the GAN updates, still exactly the one-shot sparsity round(P * s) / P
    w = np.asarray(named[n])
    assert np.sum(w == 0) == round(w.size * 0.6), n
  disc = [n for n in named if n.startswith('discriminator/') and n.endswith('kernel')]
  assert disc and all(np.mean(np.asarray(named[n]) == 0) < 0.1 for n in disc)
