"""`python -m jaxspeech.extract` on a jaxspeech Spin workdir: features, and `--units` (per-frame
codeword ids argmax(z Cᵀ)) equal to a by-hand computation from the in-memory parameters."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from flax import nnx

from experiments import spin as exp
from jaxspeech import extract
from jaxspeech.audio import load_audio, normalize_waveform
from jaxspeech.methods import spin
from jaxspeech.methods.base import encoder_config
from jaxspeech.train import checkpoint as ckpt_lib
from jaxspeech.train import partitioning
from jaxspeech.train import step as step_lib

SMALL_MODEL = {
  'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 64,
  'conv_dim': (32,) * 7, 'num_conv_pos_embeddings': 16, 'num_conv_pos_embedding_groups': 4,
}


def make_spin_workdir(workdir):
  """A Spin workdir as the trainer writes it (config.json + Orbax checkpoint after 2 steps on
  random audio): (its path, the train setup, the in-memory train state it holds)."""
  c = exp.get_config('tiny')
  for k, v in SMALL_MODEL.items():
    c.model[k] = v
  c.train.trainable = spin.trainable_regex(2, int(c.method.trainable_layers))
  c.method.codebook_size = 8
  c.method.head_dim = 8
  c.data.num_samples = 8000
  c.optim.warmup_steps = 1
  method = spin.Spin(c)
  mesh = partitioning.create_mesh(c.mesh, devices=jax.devices()[:1])
  setup = step_lib.build_setup(c, method, mesh)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  rng = np.random.default_rng(0)
  data = {'audio': jnp.asarray(rng.normal(size=(2, 8000)).astype(np.float32)),
          'audio_mask': jnp.ones((2, 8000), bool)}
  step = step_lib.jit_train_step(setup, data)
  for _ in range(2):
    state, _ = step(state, data)
  with open(workdir / 'config.json', 'w') as f:
    f.write(c.to_json_best_effort(indent=1, sort_keys=True))
  ckpt = ckpt_lib.Checkpointer(workdir / 'checkpoints', async_save=False)
  ckpt.save(2, state, force=True)
  ckpt.close()
  host = jax.device_get(state)
  return str(workdir), setup, host


@pytest.fixture(scope='module')
def spin_workdir(tmp_path_factory):
  return make_spin_workdir(tmp_path_factory.mktemp('spin_run'))


@pytest.fixture(scope='module')
def audio_files(tmp_path_factory):
  d = tmp_path_factory.mktemp('audio')
  rng = np.random.default_rng(1)
  files = []
  for name, n, sr in (('a', 12000, 16000), ('b', 21000, 16000), ('c', 9000, 8000)):
    t = np.arange(n) / sr
    wav = 0.3 * np.sin(2 * np.pi * (150 + 50 * rng.random()) * t) + 0.05 * rng.normal(size=n)
    sf.write(d / f'{name}.wav', wav.astype(np.float32), sr)
    files.append(str(d / f'{name}.wav'))
  return files


def _by_hand(setup, host, wav):
  """Encoder last hidden state, then head, L2-normalise, cosine to the codebook, argmax."""
  model, _ = setup.method.init(jax.random.key(1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, host['params'])
  model = nnx.merge(graphdef, params, rest)
  wav = jnp.asarray(wav)[None]
  hidden = model.encoder(wav, jnp.ones_like(wav, bool)).last_hidden_state[0]  # [T, D]
  p = host['params']
  z = np.asarray(hidden) @ p['head']['kernel'] + p['head']['bias']  # [T, E]
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  return np.argmax(z @ p['codebook'].T, axis=-1), np.asarray(hidden)


@pytest.mark.slow  # default run under 20 min on 2 cores; test_units_layer checks the CLI units
def test_units_equal_by_hand_argmax(spin_workdir, audio_files, tmp_path):
  workdir, setup, host = spin_workdir
  out = tmp_path / 'units.npz'
  assert extract.main(['--checkpoint', workdir, '--audio', *audio_files, '--units',
                       '--out', str(out)]) == 0
  units = np.load(out)
  assert sorted(units.files) == ['a', 'b', 'c']
  np.testing.assert_allclose(np.linalg.norm(host['params']['codebook'], axis=-1), 1.0, atol=1e-6)
  for f in audio_files:
    got = units[os.path.splitext(os.path.basename(f))[0]]
    wav = normalize_waveform(load_audio(f))  # what a workdir model is fed (as in training)
    ref, _ = _by_hand(setup, host, wav)
    assert got.dtype == np.int32 and got.shape == ref.shape
    assert got.shape[0] == encoder_config(json_config(workdir).model).num_frames(len(wav))
    assert np.all((got >= 0) & (got < 8))
    np.testing.assert_array_equal(got, ref)
  # Text output: "<stem> id id ..." per file, the same ids.
  txt = tmp_path / 'units.txt'
  assert extract.main(['--checkpoint', workdir, '--audio', *audio_files, '--units',
                       '--out', str(txt)]) == 0
  lines = dict(line.split(' ', 1) for line in txt.read_text().splitlines())
  for stem in ('a', 'b', 'c'):
    np.testing.assert_array_equal(np.array(lines[stem].split(), int), units[stem])


def json_config(workdir):
  import ml_collections

  with open(os.path.join(workdir, 'config.json')) as f:
    return ml_collections.ConfigDict(json.load(f))


def test_features_from_workdir_equal_in_memory_encoder(spin_workdir, audio_files, tmp_path):
  workdir, setup, host = spin_workdir
  out = tmp_path / 'f.npz'
  assert extract.main(['--checkpoint', workdir, '--audio', audio_files[1], '--layers', '-1',
                       '--out', str(out)]) == 0
  got = np.load(out)['b/layer_2']
  _, ref = _by_hand(setup, host, normalize_waveform(load_audio(audio_files[1])))
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_units_need_a_codebook_model(spin_workdir, audio_files, tmp_path):
  workdir, setup, host = spin_workdir
  hf_dir = tmp_path / 'hf'
  from jaxspeech.interop import hf

  hf.save_hf_checkpoint(extract.load_model(workdir), hf_dir)
  rc = extract.main(['--checkpoint', str(hf_dir), '--audio', audio_files[0], '--units',
                     '--out', str(tmp_path / 'u.npz')])
  assert rc == 2 and not (tmp_path / 'u.npz').exists()  # a user error: exit 2


def test_units_layer(spin_workdir, audio_files, tmp_path, capsys):
  """`--units --layers L`: Spin's units come from its last layer; another layer is an error."""
  workdir, _, _ = spin_workdir
  out = tmp_path / 'last.npz'
  assert extract.main(['--checkpoint', workdir, '--audio', audio_files[0], '--units', '--layers',
                       '-1', '--out', str(out)]) == 0
  assert extract.main(['--checkpoint', workdir, '--audio', audio_files[0], '--units',
                       '--out', str(tmp_path / 'default.npz')]) == 0
  np.testing.assert_array_equal(np.load(out)['a'], np.load(tmp_path / 'default.npz')['a'])
  capsys.readouterr()
  assert extract.main(['--checkpoint', workdir, '--audio', audio_files[0], '--units', '--layers',
                       '1', '--out', str(tmp_path / 'l1.npz')]) == 2
  assert 'last layer' in capsys.readouterr().err
