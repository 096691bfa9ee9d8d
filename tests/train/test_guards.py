"""Guard rails and init paths of the trainer, in-process on one CPU device."""

from __future__ import annotations

import numpy as np
import pytest

from tests.train.common import SMALL_OVERRIDES, read_metrics, small_config


def test_nan_in_batch_stops_training_naming_the_step(tmp_path, monkeypatch):
  from jaxspeech.train import data as data_lib
  from jaxspeech.train import trainer

  make_iterator = data_lib.make_iterator

  def poisoned(config, mesh=None, *, seed_offset=0, **kwargs):
    it = make_iterator(config, mesh, seed_offset=seed_offset, **kwargs)
    if seed_offset:  # the k-means sample stays clean
      return it

    def gen():
      for i, batch in enumerate(it):
        if i == 2:  # the batch of step 3
          batch = dict(batch)
          batch['audio'] = batch['audio'].copy()
          batch['audio'][1, 100] = np.nan
        yield batch

    return gen()

  monkeypatch.setattr(data_lib, 'make_iterator', poisoned)
  config = small_config(**{'train.num_steps': 6})
  with pytest.raises(trainer.NonFiniteError, match=r'Non-finite .*loss.* at step 3 '):
    trainer.train_and_evaluate(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert [r['step'] for r in rows] == [1, 2]  # nothing after the bad step was logged
  assert all(np.isfinite(r['loss']) for r in rows)


def test_frozen_groups_do_not_move(tmp_path):
  import jax

  from jaxspeech.methods.base import get_method
  from jaxspeech.train import data as data_lib
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  config = small_config(**{'train.num_steps': 3, 'train.trainable': r'^encoder/encoder/layers/1/'})
  method = get_method(config)
  mesh = partitioning.create_mesh(config.mesh)
  setup = step_lib.build_setup(config, method, mesh)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  before = jax.tree.map(np.asarray, state['params'])
  it = data_lib.make_iterator(config, mesh)
  state = dict(state, extra=jax.device_put(method.prepare(state['extra'], it),
                                           setup.state_shardings['extra']))
  batch = data_lib.to_global(next(it), mesh)
  step = step_lib.jit_train_step(setup, batch)
  for _ in range(2):
    state, metrics = step(state, batch)
  after = jax.tree.map(np.asarray, state['params'])
  paths = jax.tree.leaves(step_lib.optim.param_paths(before))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                     jax.tree.leaves(after))]
  trainable = jax.tree.leaves(setup.trainable)
  assert sum(trainable) > 0 and sum(trainable) < len(trainable)
  for path, t, m in zip(paths, trainable, moved):
    assert m == t, f'{path}: trainable={t} moved={m}'
  assert np.isfinite(float(metrics['grad_norm'])) and float(metrics['grad_norm']) > 0


def test_init_from_workdir_and_hf_checkpoint(tmp_path):
  import jax
  from flax import nnx

  from jaxspeech.interop.hf import save_hf_checkpoint
  from jaxspeech.methods.base import encoder_config, get_method
  from jaxspeech.models.speech_encoder import SpeechEncoder
  from jaxspeech.train import checkpoint as ckpt_lib
  from jaxspeech.train import partitioning, trainer
  from jaxspeech.train import step as step_lib

  config = small_config()
  method = get_method(config)
  setup = step_lib.build_setup(config, method, partitioning.create_mesh(config.mesh))
  state = step_lib.create_train_state(setup, jax.random.key(1))

  # A jaxspeech workdir: its latest checkpoint's parameters.
  ck = ckpt_lib.Checkpointer(tmp_path / 'src' / 'checkpoints', async_save=False)
  ck.save(7, state)
  ck.close()
  fresh = step_lib.create_train_state(setup, jax.random.key(2))
  config.init_from = str(tmp_path / 'src')
  loaded = trainer._load_init_from(config, method, setup, fresh)
  for a, b in zip(jax.tree.leaves(loaded['params']), jax.tree.leaves(state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # An HF checkpoint folder: the encoder's parameters, the head keeps its initialisation.
  enc = SpeechEncoder(encoder_config(config.model), rngs=nnx.Rngs(3))
  save_hf_checkpoint(enc, tmp_path / 'hf')
  config.init_from = str(tmp_path / 'hf')
  loaded = trainer._load_init_from(config, method, setup, fresh)
  want = nnx.to_pure_dict(nnx.state(enc, nnx.Param))
  want.pop('masked_spec_embed', None)
  got = dict(loaded['params']['encoder'])
  got.pop('masked_spec_embed', None)
  flat_w = jax.tree_util.tree_flatten_with_path(want)[0]
  flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  assert len(flat_w) == len(flat_g)
  for path, w in flat_w:
    np.testing.assert_allclose(np.asarray(flat_g[path]), np.asarray(w), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(loaded['params']['final_proj']),
                  jax.tree.leaves(fresh['params']['final_proj'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  config.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    trainer._load_init_from(config, method, setup, fresh)


def test_init_from_another_methods_workdir_takes_its_encoder(tmp_path):
  """HuBERT-style workdir -> DinoSR: the encoder comes over, DinoSR's own heads keep their init."""
  import jax

  from experiments import dinosr
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import checkpoint as ckpt_lib
  from jaxspeech.train import partitioning, trainer
  from jaxspeech.train import step as step_lib

  src_config = small_config()
  src_method = get_method(src_config)
  src_setup = step_lib.build_setup(src_config, src_method,
                                   partitioning.create_mesh(src_config.mesh))
  src_state = step_lib.create_train_state(src_setup, jax.random.key(1))
  (tmp_path / 'src').mkdir()
  (tmp_path / 'src' / 'config.json').write_text(src_config.to_json_best_effort())
  ck = ckpt_lib.Checkpointer(tmp_path / 'src' / 'checkpoints', async_save=False)
  ck.save(3, src_state)
  ck.close()

  config = dinosr.get_config('tiny')
  for k, v in SMALL_OVERRIDES['model'].items():
    config.model[k] = v
  config.method.average_top_k_layers = 2
  method = get_method(config)
  setup = step_lib.build_setup(config, method, partitioning.create_mesh(config.mesh))
  fresh = step_lib.create_train_state(setup, jax.random.key(2))
  config.init_from = str(tmp_path / 'src')
  loaded = trainer._load_init_from(config, method, setup, fresh)

  def sub(tree, path):
    for k in path:
      tree = tree[k]
    return tree

  got = sub(loaded['params'], method.encoder_path)
  want = sub(src_state['params'], src_method.encoder_path)
  flat_w = jax.tree_util.tree_flatten_with_path(want)[0]
  flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  assert len(flat_w) == len(flat_g) > 10
  for path, w in flat_w:
    np.testing.assert_array_equal(np.asarray(flat_g[path]), np.asarray(w))
  rest = [k for k in loaded['params'] if k != method.encoder_path[0]]
  assert rest, 'DinoSR has parameters besides its encoder'
  for k in rest:
    for a, b in zip(jax.tree.leaves(loaded['params'][k]), jax.tree.leaves(fresh['params'][k])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
