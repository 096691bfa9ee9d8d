"""UAVM (jaxspeech.methods.uavm, jaxspeech.models.av_nets): the MFCC front end equals HuBERT's,
the batch fields, which weights each variant shares, masking, one modality per step, a loss that
falls through the one train step, and `av_classification` on a trained workdir (slow)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models.av_nets import AVClassifier, AVConfig
from tests.data_pipelines.conftest import shared
from tests.methods.av_common import short_run_losses, write_pairs_manifest

# One transformer block per path (depth_i 0 + depth_s 1) keeps the compilations short.
SMALL = AVConfig(audio_dim=39, visual_dim=8, audio_frames=12, visual_frames=8, num_classes=10,
                 dim=16, num_heads=2, depth_i=0, depth_s=1, mlp_ratio=2, audio_stack=2,
                 upper_dim=8)


def small_config(**method):
  from experiments import uavm

  c = uavm.get_config('tiny')
  for k, v in {'dim': 16, 'num_heads': 2, 'depth_i': 0, 'depth_s': 1, 'mlp_ratio': 2,
               'audio_frames': 40, 'dropout': 0.0, **method}.items():
    c.method[k] = v
  c.data.batch_size = 16
  c.optim.warmup_steps = 5
  return c


def _inputs(b=4, seed=0, cfg=SMALL):
  r = np.random.default_rng(seed)
  a = r.normal(size=(b, cfg.audio_frames, cfg.audio_dim)).astype(np.float32)
  am = np.arange(cfg.audio_frames)[None] < r.integers(3, cfg.audio_frames + 1, (b, 1))
  v = r.uniform(size=(b, cfg.visual_frames, cfg.visual_dim)).astype(np.float32)
  vm = np.ones((b, cfg.visual_frames), bool)
  return jnp.asarray(a * am[..., None]), jnp.asarray(am), jnp.asarray(v), jnp.asarray(vm)


def test_mfcc_front_end_equals_hubert():
  from jaxspeech.audio import load_audio
  from jaxspeech.methods import hubert, uavm

  wav = load_audio(shared('fsdd', 'recordings', '3_theo_7.wav'))  # 8 kHz -> 16 kHz
  ours = uavm.mfcc_np(wav)
  ref = np.asarray(hubert.mfcc(jnp.asarray(wav)[None], input_scale='kaldi'))[0]
  assert ours.shape == ref.shape == (hubert.num_mfcc_frames(len(wav)), 13)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-3)  # float32 FFTs, |c| up to ~100
  np.testing.assert_allclose(uavm.deltas_np(ours), np.asarray(hubert.deltas(ref[None]))[0],
                             rtol=1e-4, atol=1e-3)
  x = uavm.clip_features(shared('fsdd', 'recordings', '3_theo_7.wav'))
  assert x.shape == (len(ref), 39)
  np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)  # per-clip normalisation
  np.testing.assert_allclose(x.std(0), 1.0, atol=1e-3)


def test_fit_frames_centre_crops_and_pads():
  from jaxspeech.methods.uavm import fit_frames

  x = np.arange(10, dtype=np.float32)[:, None]
  y, m = fit_frames(x, 4)
  assert y[:, 0].tolist() == [3, 4, 5, 6] and m.all()
  y, m = fit_frames(x, 12)
  assert y[:10, 0].tolist() == list(range(10)) and y[10:].sum() == 0
  assert m.tolist() == [True] * 10 + [False] * 2


def test_host_fields_are_the_declared_batch():
  from jaxspeech.methods.uavm import Uavm

  m = Uavm(small_config())
  img = list(range(64))
  row = {'id': '3_theo_7', 'path': shared('fsdd', 'recordings', '3_theo_7.wav'), 'label': 3,
         'image': img}
  f = m.host_fields(row)
  spec = m.row_fields()
  assert set(f) == set(spec)
  for k, s in spec.items():
    assert f[k].shape == s.shape and f[k].dtype == s.dtype, k
  np.testing.assert_array_equal(f['visual_feats'] * 16, np.reshape(img, (8, 8)))  # rows = frames
  assert f['visual_feats_mask'].all() and f['label'] == 3
  n = int(f['audio_feats_mask'].sum())
  assert 0 < n <= 40 and not f['audio_feats'][n:].any()
  with pytest.raises(ValueError, match='label 10'):
    m.host_fields({**row, 'label': 10})
  with pytest.raises(ValueError, match='63 values'):
    m.host_fields({**row, 'image': img[:63]})


def test_paper_variant_needs_a_manifest():
  from experiments import uavm
  from jaxspeech.errors import ConfigError
  from jaxspeech.methods.base import get_method

  with pytest.raises(ConfigError, match='config.data.manifest: required'):
    get_method(uavm.get_config('paper')).training_rows()
  c = small_config()
  c.method.sharing = 'both'
  with pytest.raises(ConfigError, match='sharing'):
    get_method(c)


def _model(cfg: AVConfig, seed: int = 0):
  """(graphdef, params) of an AVClassifier, initialised under one jit (eager init would compile
  every initializer op separately)."""
  gd = nnx.graphdef(nnx.eval_shape(lambda: AVClassifier(cfg, rngs=nnx.Rngs(seed))))
  params = jax.jit(lambda: nnx.state(AVClassifier(cfg, rngs=nnx.Rngs(seed))))()
  return gd, params


@functools.cache
def _variant(sharing: str):
  """(params, predict) of SMALL with this sharing, compiled once per test session."""
  gd, params = _model(dataclasses.replace(SMALL, sharing=sharing))
  return params, _predict(gd)


def _predict(gd):
  """One jitted function: audio / video / AV logits (and fused ones for 'fusion') of the params
  with `shift` added to every parameter under each named top-level attribute."""

  @jax.jit
  def f(params, shift, a, am, v, vm):
    flat = nnx.to_flat_state(params)
    p = nnx.from_flat_state({k: x.replace(x[...] + shift.get(k[0], 0.0)) for k, x in flat})
    m = nnx.merge(gd, p)
    out = {'audio': m.logits(a, am, 'audio'), 'visual': m.logits(v, vm, 'visual'),
           'av': m.av_logits(a, am, v, vm)}
    hs, mask = m.layers(a, am, 'audio')
    out['audio_layers'], out['audio_layer_mask'] = hs, mask
    return out

  return f


def test_what_each_variant_shares():
  a, am, v, vm = _inputs()
  for sharing, top in (('shared', ('audio_stage', 'visual_stage', 'upper', 'head')),
                       ('separate', ('audio_stage', 'visual_stage', 'audio_upper',
                                     'visual_upper', 'audio_head', 'visual_head'))):
    params, f = _variant(sharing)
    assert {k[0] for k, _ in nnx.to_flat_state(params)} == set(top)  # exactly these parts
    zero = {t: jnp.float32(0.0) for t in top}
    base = f(params, zero, a, am, v, vm)

    def moved(part, base=base, f=f, zero=zero, params=params):
      got = f(params, {**zero, part: jnp.float32(0.1)}, a, am, v, vm)
      return tuple(float(jnp.abs(got[m] - base[m]).max()) for m in ('audio', 'visual'))

    # Each modality's own stage serves only it ...
    assert moved('audio_stage')[0] > 1e-3 and moved('audio_stage')[1] == 0.0
    assert moved('visual_stage')[1] > 1e-3 and moved('visual_stage')[0] == 0.0
    if sharing == 'shared':  # ... UAVM's upper stage and head serve both modalities,
      assert min(moved('upper')) > 1e-3 and min(moved('head')) > 1e-3
    else:  # ... and with separate branches nothing does.
      for m, part in enumerate(('audio_upper', 'audio_head', 'visual_upper', 'visual_head')):
        d = moved(part)
        assert d[m // 2] > 1e-3 and d[1 - m // 2] == 0.0, part
    # AV = the mean of the two modalities' logits.
    np.testing.assert_allclose(base['av'], 0.5 * (base['audio'] + base['visual']), rtol=1e-5,
                               atol=1e-6)


def test_fusion_attends_across_modalities_and_masks_padding():
  a, am, v, vm = _inputs()
  _, _, v2, _ = _inputs(seed=5)
  a2, _, _, _ = _inputs(seed=6)
  junk = a + 5.0 * (~am)[..., None]  # other values in the padded audio frames
  for sharing in ('fusion', 'shared'):
    params, f = _variant(sharing)

    def run(a_, v_, am_=am, vm_=vm, f=f, params=params):
      return f(params, {}, a_, am_, v_, vm_)

    base = run(a, v)
    # Padding (masked frames) never changes any prediction or hidden state.
    got = run(junk, v)
    for k in ('audio', 'av'):
      np.testing.assert_allclose(got[k], base[k], rtol=1e-5, atol=1e-5)
    w = np.asarray(base['audio_layer_mask'])[..., None]
    np.testing.assert_allclose(got['audio_layers'][-1] * w, base['audio_layers'][-1] * w,
                               rtol=1e-5, atol=1e-5)
    # A row with no valid frame at all (the filler rows of a batch) stays finite.
    none = run(a, v, jnp.zeros_like(am), jnp.zeros_like(vm))
    assert all(np.isfinite(np.asarray(none[k])).all() for k in ('audio', 'visual', 'av'))
    if sharing == 'fusion':
      # Fused logits depend on both inputs (a change that LayerNorm does not remove) ...
      assert float(jnp.abs(run(a, v2)['av'] - base['av']).max()) > 1e-3
      assert float(jnp.abs(run(a2 * am[..., None], v)['av'] - base['av']).max()) > 1e-3
      # ... while the audio-only logits see no video.
      np.testing.assert_array_equal(run(a, v2)['audio'], base['audio'])
    assert len(base['audio_layers']) == SMALL.num_layers + 1
    assert base['audio_layers'][-1].shape == (4, 6, 8)  # upper_dim
    assert base['audio_layers'][0].shape == (4, 6, 16)  # dim


def test_one_modality_per_step():
  import optax

  from jaxspeech.methods.uavm import Uavm

  method = Uavm(small_config(audio_frames=12, audio_stack=2))
  cfg = method.model_config
  gd, params = _model(cfg)
  a, am, v, vm = _inputs(b=4, cfg=cfg)
  batch = {'audio_feats': a, 'audio_feats_mask': am, 'visual_feats': v, 'visual_feats_mask': vm,
           'label': jnp.asarray([1, 2, 3, 4], jnp.int32), 'valid': jnp.ones((4,), bool)}

  @jax.jit
  def losses(keys):
    m = nnx.merge(gd, params)
    t = optax.smooth_labels(jax.nn.one_hot(batch['label'], 10), 0.1)
    ce = {mod: optax.softmax_cross_entropy(m.logits(x, mask, mod), t).mean()
          for mod, x, mask in (('audio', a, am), ('visual', v, vm))}
    step = jax.vmap(lambda k: method.loss_fn(m, {}, batch, k))(keys)
    return step, ce

  (loss, (metrics, _)), ce = losses(jax.random.split(jax.random.key(3), 64))
  picks = np.asarray(metrics['audio_step'])
  assert set(picks.tolist()) == {0.0, 1.0} and 0.3 < picks.mean() < 0.7  # Bernoulli(0.5)
  # Each step's loss is exactly the label-smoothed CE of the chosen modality's logits.
  want = np.where(picks > 0.5, float(ce['audio']), float(ce['visual']))
  np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-5)


@pytest.mark.slow  # ~10 s each on 2 CPU cores (6 s of it compiling the train step)
@pytest.mark.parametrize('sharing', ['shared', 'separate', 'fusion'])
def test_a_few_steps_of_the_one_train_step_reduce_the_loss(tmp_path, sharing):
  """20 steps of the shared train step on 32 real pairs (repeated): the loss of the last steps is
  below that of the first ones."""
  c = small_config(sharing=sharing)
  c.data.manifest = write_pairs_manifest(tmp_path / 'm.jsonl')
  c.optim.learning_rate = 3e-3
  losses = short_run_losses(c, 20)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses


@pytest.mark.slow
def test_trained_workdir_evaluates_audio_visual_and_probe(tmp_path):
  """The tiny config (shortened) through the trainer; `evaluate --task av_classification` with the
  probe gives the numbers the run logged, above chance."""
  from experiments import uavm
  from jaxspeech import evaluate
  from jaxspeech.train import trainer

  os.environ['JAXSPEECH_CACHE'] = str(tmp_path / 'cache')
  try:
    c = uavm.get_config('tiny')
    c.train.num_steps = 300
    c.train.eval_every = 300
    final = trainer.train_and_evaluate(c, str(tmp_path / 'w'))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      rc = evaluate.main(['--checkpoint', str(tmp_path / 'w'), '--task', 'av_classification',
                          '--split', 'test', '--fit_split', 'test'])
  finally:
    del os.environ['JAXSPEECH_CACHE']
  assert rc == 0
  got = json.loads(out.getvalue().strip().splitlines()[-1])
  for k in ('audio', 'visual', 'av'):
    assert np.isclose(got[k], final[f'eval/test/{k}']), (k, got, final)
    assert got[k] > 0.3, got  # 10 classes: chance 0.1, on unseen speakers / images
  assert got['num_examples'] == 1000
  probes = [got[f'probe/layer_{i}'] for i in range(c.method.depth_i + c.method.depth_s + 1)]
  assert all(0.0 <= p <= 1.0 for p in probes) and probes[0] > 0.9  # the inputs differ
