"""Spin mechanics on tiny shapes (frozen layers, unit codebook rows, valid frames only, both
perturbation back-ends) and a short training run on synthetic speech whose loss must fall."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import spin as exp
from jaxspeech.methods import spin
from jaxspeech.ops import swapped_prediction as sp
from jaxspeech.train import partitioning
from jaxspeech.train import step as step_lib

SMALL_MODEL = {
  'hidden_size': 32, 'num_hidden_layers': 3, 'num_attention_heads': 2, 'intermediate_size': 64,
  'conv_dim': (32,) * 7, 'num_conv_pos_embeddings': 16, 'num_conv_pos_embedding_groups': 4,
}


def small_config(trainable_layers=1, perturb='praat', **method):
  c = exp.get_config('tiny')
  for k, v in SMALL_MODEL.items():
    c.model[k] = v
  c.data.num_samples = 8000
  c.data.perturb = 'praat' if perturb == 'praat' else ''
  c.method.perturb = perturb
  c.method.trainable_layers = trainable_layers
  c.train.trainable = spin.trainable_regex(3, trainable_layers)
  c.method.codebook_size = 16
  c.method.head_dim = 8
  for k, v in method.items():
    c.method[k] = v
  return c


def batch(b=4, s=8000, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([s, s - 1600, s, s - 3200][:b])
  mask = np.arange(s)[None] < lengths[:, None]
  audio = np.where(mask, rng.normal(size=(b, s)), 0.0).astype(np.float32)
  pert = np.where(mask, audio + 0.3 * rng.normal(size=(b, s)), 0.0).astype(np.float32)
  return {'audio': jnp.asarray(audio), 'audio_mask': jnp.asarray(mask),
          'audio_perturbed': jnp.asarray(pert)}


def setup_for(c):
  method = spin.Spin(c)
  mesh = partitioning.create_mesh(c.mesh, devices=jax.devices()[:1])
  return step_lib.build_setup(c, method, mesh)


def flat(tree):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_trainable_regex_selects_top_layers_head_and_codebook():
  rx = re.compile(spin.trainable_regex(12, 2))
  assert rx.search('encoder/encoder/layers/10/attention/q_proj/kernel')
  assert rx.search('encoder/encoder/layers/11/final_layer_norm/scale')
  assert rx.search('head/kernel') and rx.search('codebook')
  for frozen in ('encoder/encoder/layers/1/attention/q_proj/kernel',
                 'encoder/encoder/layers/9/feed_forward/output_dense/bias',
                 'encoder/encoder/pos_conv_embed/weight_v', 'encoder/encoder/layer_norm/scale',
                 'encoder/feature_extractor/conv_layers/0/conv/kernel',
                 'encoder/feature_projection/projection/kernel', 'encoder/masked_spec_embed'):
    assert not rx.search(frozen), frozen
  c = small_config()
  c.train.trainable = '.*'  # disagrees with trainable_layers: an error naming the fix
  with pytest.raises(ValueError, match='trainable_layers'):
    spin.Spin(c)
  c = small_config()
  c.data.perturb = ''
  with pytest.raises(ValueError, match="data.perturb='praat'"):
    spin.Spin(c)


def test_one_step_frozen_layers_fixed_codebook_unit_norm():
  c = small_config(trainable_layers=1)
  c.optim.learning_rate = 0.05  # large, so unnormalised codebook rows would visibly drift
  c.optim.warmup_steps = 1
  c.optim.init_lr_ratio = 1.0
  setup = setup_for(c)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  before = flat(state['params'])
  data = batch()
  step = step_lib.jit_train_step(setup, data)
  state, metrics = step(state, data)
  assert np.isfinite(float(metrics['loss']))
  after = flat(state['params'])
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  rx = re.compile(c.train.trainable)
  for k in before:
    if rx.search(k):
      assert k in moved, f'trainable {k} did not move'
    else:
      assert k not in moved, f'frozen {k} moved'
  assert any(k.startswith('encoder/encoder/layers/2/') for k in moved)
  norms = np.linalg.norm(after['codebook'], axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-6)
  # Without the renormalisation the update would have changed the norms.
  assert not np.array_equal(after['codebook'], before['codebook'])


def _loss(method, model, data, rng=1):
  return method.loss_fn(model, {}, data, jax.random.key(rng))


def test_loss_over_valid_frames_only():
  """Padding content changes nothing; the loss equals spin_loss on the valid frames; the number
  of frames counted is the sum of the frame lengths."""
  c = small_config()
  method = spin.Spin(c)
  model, _ = method.init(jax.random.key(0))
  data = batch()
  loss, (metrics, _) = jax.jit(lambda d: _loss(method, model, d))(data)
  noisy = dict(data)
  rng = np.random.default_rng(5)
  for key in ('audio', 'audio_perturbed'):
    noise = rng.normal(size=data[key].shape).astype(np.float32) * 3.0
    noisy[key] = jnp.where(data['audio_mask'], data[key], noise)
  loss2, _ = jax.jit(lambda d: _loss(method, model, d))(noisy)
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-5)
  lengths = np.asarray(method.enc_cfg.frame_lengths(np.asarray(data['audio_mask']).sum(-1)))
  assert float(metrics['valid_frames']) == lengths.sum()
  # Independent recomputation: encoder per view, head, normalise, spin_loss on the frame mask.
  @jax.jit
  def by_views(d):
    o1 = model.encoder(d['audio'], d['audio_mask'])
    o2 = model.encoder(d['audio_perturbed'], d['audio_mask'])
    return sp.spin_loss(model.project(o1.last_hidden_state), model.project(o2.last_hidden_state),
                        model.codebook[...], o1.frame_mask, 0.02, 3, 0.1).loss

  ref = by_views(data)
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  # Truncating the batch to its valid frames changes the target marginals only through padding,
  # which is excluded: the loss of a single utterance equals that of the same utterance padded.
  one = {k: v[1:2, :6400] for k, v in data.items()}
  padded = {k: v[1:2] for k, v in data.items()}
  a, _ = jax.jit(lambda d: _loss(method, model, d))(one)
  b, _ = jax.jit(lambda d: _loss(method, model, d))(padded)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


@pytest.fixture(scope='module')
def synth_corpus(tmp_path_factory):
  from data_pipelines import synth

  try:
    synth.check_tools(synth.SPEAKERS[s].voice for s in ('us1', 'us3'))
  except RuntimeError as e:
    pytest.skip(str(e))
  return synth.synthesize_corpus(tmp_path_factory.mktemp('synth') / 'c', 20, seed=3,
                                 voices=['us1', 'us3'])


def test_perturbation_backends_give_equal_length_views(synth_corpus):
  """'praat' (Grain workers) and 'jax' (in the step) views: same shape and mask as the audio,
  zero in the padding, really different from the original on valid samples."""
  from data_pipelines import pipeline
  from data_pipelines.manifest import read_manifest

  rows = read_manifest(synth_corpus)[:4]
  ds = pipeline.make_dataset(rows, batch_size=4, bucket_lengths=(64_000,), seed=0,
                             shuffle=False, num_epochs=1, perturb='praat', drop_remainder=False)
  host = next(iter(ds))
  audio, mask = host['audio'], host['audio_mask']
  assert mask.sum(1).min() < audio.shape[1]  # at least one padded utterance
  praat = host['audio_perturbed']
  jax_view = np.asarray(jax.jit(spin.perturb_view)(jax.random.key(0), audio, mask))
  for view in (praat, jax_view):
    assert view.shape == audio.shape and view.dtype == np.float32
    assert np.all(np.isfinite(view))
    assert np.all(view[~mask] == 0.0)
    for i in range(len(audio)):
      v, a = view[i, mask[i]], audio[i, mask[i]]
      assert np.corrcoef(v, a)[0, 1] < 0.95  # speaker-perturbed, not a copy
  # The jax view is re-normalised like the pipeline's inputs.
  for i in range(len(audio)):
    v = jax_view[i, mask[i]]
    assert abs(v.mean()) < 1e-3 and abs(v.std() - 1.0) < 1e-3
  # The in-step back-end: loss_fn makes the view itself (no audio_perturbed needed), same frames.
  c = small_config(perturb='jax')
  method = spin.Spin(c)
  model, _ = method.init(jax.random.key(0))
  data = {'audio': jnp.asarray(audio[:, :8000]), 'audio_mask': jnp.asarray(mask[:, :8000])}
  loss, (metrics, _) = jax.jit(lambda d: _loss(method, model, d))(data)
  assert np.isfinite(float(loss))
  lengths = np.asarray(method.enc_cfg.frame_lengths(mask[:, :8000].sum(-1)))
  assert float(metrics['valid_frames']) == lengths.sum()


def test_paper_config_values():
  c = exp.get_config('paper')
  m, o = c.method, c.optim
  assert (m.codebook_size, m.head_dim, m.epsilon, m.sinkhorn_iters, m.temperature) == (
    256, 256, 0.02, 3, 0.1)
  assert (o.learning_rate, o.weight_decay, o.clip_norm, o.warmup_steps) == (1e-4, 1e-6, 10.0, 2500)
  assert c.train.num_steps == 5000
  assert c.data.batch_size * c.data.num_samples == 4_096_000  # spin.yaml batch_len, 256 s
  from jaxspeech.train import optim
  sched = optim.make_schedule(o, c.train.num_steps)
  np.testing.assert_allclose([float(sched(0)), float(sched(2500)), float(sched(5000))],
                             [1e-6, 1e-4, 1e-6], rtol=1e-5)
  assert c.train.trainable == spin.trainable_regex(12, 2)


@pytest.mark.slow  # default run under 20 min on 2 cores
def test_short_training_run_loss_falls(synth_corpus):
  """60 steps of a small Spin model (all 3 layers trainable, from random weights; the 'jax'
  perturbation in the step) on 20 synthetic utterances: the swapped-prediction loss falls by more
  than 1 nat (measured: 4.96 -> 3.19) and each view's code agrees with the other view's target
  above chance 1/K (measured 0.10 vs 0.0625; from random weights 60 steps teach little more)."""
  from jaxspeech.train import data as data_lib

  c = small_config(trainable_layers=3, perturb='jax')
  c.data.manifest = synth_corpus
  c.data.split = ''
  c.data.batch_size = 4
  c.data.num_samples = 16000
  c.train.num_steps = 60
  c.optim.warmup_steps = 10
  setup = setup_for(c)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  mesh = setup.mesh
  it = data_lib.make_iterator(c, mesh)
  first = data_lib.to_global(next(it), mesh)
  keys = ('audio', 'audio_mask')
  step = step_lib.jit_train_step(setup, {k: first[k] for k in keys})
  hist = []
  for i in range(60):
    b = first if i == 0 else data_lib.to_global(next(it), mesh)
    state, m = step(state, {k: b[k] for k in keys})
    hist.append({k: float(v) for k, v in m.items()})
  start = np.mean([h['loss'] for h in hist[:3]])
  start_acc = np.mean([h['swap_accuracy'] for h in hist[:3]])
  end = {key: np.mean([h[key] for h in hist[-10:]]) for key in hist[-1]}
  k = c.method.codebook_size
  assert end['loss'] < start - 1.0, (start, end['loss'])
  assert end['swap_accuracy'] > 1.3 / k, (start_acc, end)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(state['params']['codebook']), axis=-1),
                             1.0, atol=1e-5)


@pytest.fixture(scope='module')
def demo_results(tmp_path_factory):
  """The README's main job, end to end in a fresh workdir (pretraining included; ~20 min)."""
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workdir = tmp_path_factory.mktemp('demo')
  proc = subprocess.run([sys.executable, '-m', 'jaxspeech.demo', '--workdir', str(workdir)],
                        cwd=root, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'results.json') as f:
    return json.load(f)


@pytest.mark.slow
def test_demo_spin_lowers_speaker_information(demo_results):
  r = demo_results
  init, spin_ = r['initial'], r['spin']
  assert r['eval_speakers'] == ['en1_high', 'us2_high']  # held out from both trainings
  assert r['wall_seconds'] <= 20 * 60
  assert spin_['speaker_acc_frame'] < init['speaker_acc_frame']
  assert spin_['speaker_acc_frame_all'] < init['speaker_acc_frame_all']  # 8 voices
  assert spin_['units_speaker_nmi'] < init['kmeans_speaker_nmi']
  assert r['kmeans_fit_split'] == 'train'  # k-means labels the held-out speakers (fairseq's way)
  # Content kept: Spin's own units' phone purity beats k-means of the initial features, and
  # k-means of Spin's features beats the initial's.
  assert spin_['units_phone_purity'] > init['kmeans_phone_purity']
  assert spin_['kmeans_pnmi'] > init['kmeans_pnmi']


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason='Dec 2, libri-light ABX and fairseq-scale MFCC targets for '
                   'the initial encoder: Spin 9.69% vs initial 9.66% across speakers (issue 15)')
def test_demo_spin_keeps_abx_across(demo_results):
  assert demo_results['spin']['abx_across'] <= demo_results['initial']['abx_across']


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason='Dec 2, fairseq-scale MFCC targets for the initial encoder: '
                   'Spin units 0.445 vs initial k-means 0.443 (was 0.442 vs 0.426; issue 15)')
def test_demo_spin_units_pnmi_clearly_above_initial_kmeans(demo_results):
  """Issue 6: Spin's own units more phonetic than k-means of the initial features at the same K,
  by more than the spread of k-means over its seeds (0.426 / 0.431 / 0.437 for seeds 0-2)."""
  assert demo_results['spin']['units_pnmi'] > demo_results['initial']['kmeans_pnmi'] + 0.01


_DEVICES_SCRIPT = '''
import json
import jax, jax.numpy as jnp, numpy as np
from tests.methods.test_spin import small_config, setup_for
from jaxspeech.train import partitioning, step as step_lib
from jaxspeech.methods import spin
c = small_config(trainable_layers=3, perturb='jax')
c.mesh.shape = {'data': jax.device_count(), 'fsdp': 1, 'model': 1}
setup = step_lib.build_setup(c, spin.Spin(c), partitioning.create_mesh(c.mesh))
state = step_lib.create_train_state(setup, jax.random.key(0))
rng = np.random.default_rng(0)
lengths = np.array([8000, 6400, 8000, 4800, 7200, 8000, 5600, 8000])
mask = np.arange(8000)[None] < lengths[:, None]
host = {'audio': np.where(mask, rng.normal(size=(8, 8000)), 0).astype(np.float32),
        'audio_mask': mask}
batch = {k: jax.device_put(v, partitioning.batch_sharding(setup.mesh, v.ndim))
         for k, v in host.items()}
step = step_lib.jit_train_step(setup, batch)
losses = []
for _ in range(3):
  state, m = step(state, batch)
  losses.append(float(m['loss']))
print('RESULT ' + json.dumps({'losses': losses, 'devices': jax.device_count(),
                              'batch_shards': len(batch['audio'].addressable_shards)}))
'''


@pytest.mark.slow  # ~60 s: two interpreters, each compiling the step
def test_one_vs_eight_devices_same_spin_losses():
  """3 Spin steps (in-step JAX perturbation, Sinkhorn marginals over the global batch) on 1 device
  and on 8 fake CPU devices with the batch split 8 ways: the same losses."""
  import json

  from tests.train.common import run_python

  out = {}
  for n in (1, 8):
    proc = run_python(_DEVICES_SCRIPT, devices=n, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
    out[n] = json.loads(line[len('RESULT '):])
  assert out[8]['devices'] == 8 and out[8]['batch_shards'] == 8
  ref, got = np.asarray(out[1]['losses']), np.asarray(out[8]['losses'])
  assert np.all(np.isfinite(ref)) and len(set(np.round(ref, 6))) == 3  # the losses move
  np.testing.assert_allclose(got, ref, rtol=1e-5)
