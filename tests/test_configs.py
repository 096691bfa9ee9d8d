"""Every experiment config loads, its state shape-checks (`jax.eval_shape`, nothing allocated),
and bad overrides fail with errors naming the key."""

from __future__ import annotations

import glob
import importlib
import os

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(
  os.path.splitext(os.path.basename(p))[0]
  for p in glob.glob(os.path.join(REPO, 'experiments', '*.py'))
  if not os.path.basename(p).startswith('_'))
CASES = [(name, variant) for name in EXPERIMENTS
         for variant in importlib.import_module(f'experiments.{name}').VARIANTS]

REQUIRED = ('train.num_steps', 'train.log_every', 'train.checkpoint_every', 'train.seed',
            'train.trainable', 'init_from', 'data.manifest', 'method.name', 'mesh.shape',
            'mesh.rules', 'optim')


def _get(config, dotted):
  node = config
  for k in dotted.split('.'):
    node = node[k]
  return node


def test_every_experiment_has_variants():
  assert EXPERIMENTS, 'no experiments/*.py found'
  for name in EXPERIMENTS:
    mod = importlib.import_module(f'experiments.{name}')
    assert mod.__doc__ and 'python -m jaxspeech.main --config experiments/' in mod.__doc__, name
    assert 'tiny' in mod.VARIANTS and 'paper' in mod.VARIANTS, name


@pytest.mark.parametrize('name,variant', CASES)
def test_config_loads_and_state_shape_checks(name, variant):
  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  config = importlib.import_module(f'experiments.{name}').get_config(variant)
  for key in REQUIRED:
    _get(config, key)  # raises KeyError/AttributeError naming a missing key
  method = get_method(config)
  assert method.name == config.method.name
  mesh = partitioning.create_mesh(config.mesh, devices=jax.devices()[:1])
  setup = step_lib.build_setup(config, method, mesh)
  params = setup.abstract_state['params']
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert n > 0
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(setup.abstract_state))
  # Every optimizer moment has a sharding and the trainable mask covers every parameter.
  assert len(jax.tree.leaves(setup.trainable)) == len(jax.tree.leaves(params))
  assert jax.tree.structure(setup.state_shardings) == jax.tree.structure(setup.abstract_state)
  # Every parameter group has its optimizer block (flat config.optim or config.optim.<group>).
  from jaxspeech.methods.base import group_optim_config
  for g in setup.groups:
    assert float(group_optim_config(config.optim, g).learning_rate) > 0
  # The step traces on the method's declared batch (shapes only).
  batch = method.batch_spec(config)
  _, metrics = jax.eval_shape(step_lib.make_train_step(setup), setup.abstract_state, batch)
  assert metrics['loss'].shape == ()
  if name == 'hubert' and variant == 'paper':
    # HuBERT-base: ~94.7 M encoder parameters (HF HubertModel) + the 768->256 head + 100 x 256.
    assert 94e6 < n < 96e6, n


def test_bad_overrides_name_the_key():
  from experiments import hubert
  from jaxspeech.methods.base import encoder_config, get_method

  config = hubert.get_config('tiny')
  with pytest.raises(AttributeError, match='no_such_key'):
    config.train.no_such_key = 1  # configs are locked: a misspelt key fails loudly
  config = hubert.get_config('tiny')
  with pytest.raises(TypeError):
    config.train.num_steps = 'many'
  config = hubert.get_config('tiny')
  config.method.name = 'nope'
  with pytest.raises(ValueError, match='nope'):
    get_method(config)
  config = hubert.get_config('tiny')
  config.model.preset = 'giant'
  with pytest.raises(ValueError, match='giant'):
    encoder_config(config.model)
  config = hubert.get_config('tiny')
  config.train.trainable = '^nothing_matches$'
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib
  mesh = partitioning.create_mesh(config.mesh, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='nothing_matches'):
    step_lib.build_setup(config, get_method(config), mesh)
  config = hubert.get_config('tiny')
  config.mesh.shape.data = 3
  with pytest.raises(ValueError, match='mesh'):
    partitioning.create_mesh(config.mesh, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match='unknown variant'):
    hubert.get_config('huge')
