"""Cross-modal code matching (jaxspeech.methods.cmcm, jaxspeech.models.cmcm_nets): the summary
InfoNCE against numpy, the loss's parts and gradients (CMCM reaches both encoders' units; the
baseline is exactly the summary loss), the EMA codebook pooled over both modalities, the
retrieval predictions, and a loss that falls through the one train step (slow)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.ops import vq
from tests.data_pipelines.conftest import shared
from tests.methods.av_common import short_run_losses, write_pairs_manifest

B = 6


def small_config(**method):
  from experiments import cmcm

  c = cmcm.get_config('tiny')
  for k, v in {'dim': 16, 'num_heads': 2, 'depth': 0, 'mlp_ratio': 2, 'audio_frames': 12,
               'audio_stack': 2, 'code_dim': 8, 'embed_dim': 8, 'codebook_size': 16,
               'dropout': 0.0, **method}.items():
    c.method[k] = v
  c.data.batch_size = 16
  c.optim.warmup_steps = 5
  return c


def _batch(seed=0):
  r = np.random.default_rng(seed)
  am = np.arange(12)[None] < r.integers(3, 13, (B, 1))  # ragged audio
  a = r.normal(size=(B, 12, 39)).astype(np.float32) * am[..., None]
  v = r.uniform(size=(B, 8, 8)).astype(np.float32)
  return {'audio_feats': jnp.asarray(a), 'audio_feats_mask': jnp.asarray(am),
          'visual_feats': jnp.asarray(v), 'visual_feats_mask': jnp.ones((B, 8), bool),
          'label': jnp.arange(B, dtype=jnp.int32) % 10, 'valid': jnp.ones((B,), bool)}


def _np_info_nce(za, zb, valid, t):
  """Reference: symmetric InfoNCE over the valid rows only, float64."""
  za, zb = np.asarray(za, np.float64)[valid], np.asarray(zb, np.float64)[valid]
  logits = za @ zb.T / t
  lsm_r = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  lsm_c = logits - np.log(np.exp(logits).sum(0, keepdims=True))
  return -(np.trace(lsm_r) + np.trace(lsm_c)) / (2 * len(za))


def test_summary_info_nce_equals_numpy_and_ignores_filler_rows():
  from jaxspeech.methods.cmcm import summary_info_nce

  f = jax.jit(summary_info_nce, static_argnums=3)  # one compilation for every call below
  r = np.random.default_rng(0)
  za, zb = r.normal(size=(2, 7, 5)).astype(np.float32)
  za /= np.linalg.norm(za, axis=-1, keepdims=True)
  zb /= np.linalg.norm(zb, axis=-1, keepdims=True)
  valid = np.array([True] * 5 + [False] * 2)
  loss, _, _ = f(za, zb, valid, 0.1)
  np.testing.assert_allclose(float(loss), _np_info_nce(za, zb, valid, 0.1), rtol=1e-5)
  # Filler rows: whatever they hold, nothing changes (and the gradient stays finite).
  zb2 = zb.copy()
  zb2[5:] = zb[0]  # a filler row identical to a valid one would be a hard negative
  assert float(f(za, zb2, valid, 0.1)[0]) == float(loss)
  g = np.asarray(jax.jit(jax.grad(lambda a: f(a, zb, valid, 0.1)[0]))(za))
  assert np.isfinite(g).all() and not g[5:].any() and np.abs(g[:5]).max() > 1e-3
  # Accuracies: identical embeddings retrieve their own pair; a shuffled partner does not.
  _, acc_ab, acc_ba = f(za, za, np.ones(7, bool), 0.1)
  assert float(acc_ab) == float(acc_ba) == 1.0
  _, acc_ab, _ = f(za, za[::-1], np.ones(7, bool), 0.1)
  assert float(acc_ab) == pytest.approx(1 / 7)  # only the middle row keeps its partner


@functools.cache
def _setup():
  """(graphdef, params, rest, extra, batch) of the small model; the same parameters and codebook
  serve every cmcm_weight (the weight changes neither)."""
  from jaxspeech.methods.cmcm import Cmcm

  method = Cmcm(small_config())
  model, extra = jax.jit(lambda: method.init(jax.random.key(0)))()
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  return gd, params, rest, extra, _batch()


def _method(cmcm_weight: float):
  from jaxspeech.methods.cmcm import Cmcm

  return Cmcm(small_config(cmcm_weight=cmcm_weight, alpha=0.5))


@functools.cache
def _step(cmcm_weight: float):
  """`loss_fn`'s (loss, metrics, new extra state) and its gradient: one jit per weight."""
  method = _method(cmcm_weight)
  gd, params, rest, extra, batch = _setup()

  @jax.jit
  def run(params, extra, batch):
    def loss_of(p):
      return method.loss_fn(nnx.merge(gd, p, rest), extra, batch, jax.random.key(1))

    (loss, (metrics, new_extra)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, metrics, new_extra, grads

  return method, run(params, extra, batch)


@functools.cache
def _refs():
  """References computed here from the model's own encodings with the ops (dropout is 0: the
  loss's encodings are these), and the retrieval predictions: one forward jit."""
  from jaxspeech.methods.cmcm import codebook_state, summary_info_nce

  method = _method(1.0)
  gd, params, rest, extra, batch = _setup()

  @jax.jit
  def run(params, extra, batch):
    m = nnx.merge(gd, params, rest)
    ea = m.encode(batch['audio_feats'], batch['audio_feats_mask'], 'audio')
    ev = m.encode(batch['visual_feats'], batch['visual_feats_mask'], 'visual')
    state = codebook_state(extra['codebook'])
    ref = {'summary': summary_info_nce(ea.summary, ev.summary, batch['valid'],
                                       method.temperature)[0]}
    qa = vq.vector_quantize(ea.units, state.codebook, ea.mask, method.commitment_cost)
    qv = vq.vector_quantize(ev.units, state.codebook, ev.mask, method.commitment_cost)
    ref['cmcm'] = vq.cmcm_loss(vq.code_distribution(ea.units, state.codebook, ea.mask),
                               vq.code_distribution(ev.units, state.codebook, ev.mask))
    ref['commit'] = qa.commitment_loss + qv.commitment_loss
    ref['ema_both'] = vq.ema_codebook_update(state, [ea.units, ev.units], [qa.codes, qv.codes],
                                             [ea.mask, ev.mask], method.codebook_decay)
    preds = method.predict_fns(m, extra)
    pa = preds['pair_embeddings'](batch, 'audio')
    pv = preds['pair_embeddings'](batch, 'visual')
    ref['pred'] = {'pa': pa, 'pv': pv, **{part: preds['pair_similarity'](pa, pv, part)
                                          for part in ('combined', 'summary', 'codes')}}
    return ref

  return run(params, extra, batch)


def _grad_norm(grads, *path):
  node = grads
  for k in path:
    node = node[k]
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x[...])) for x in jax.tree.leaves(node))))


def test_retrieval_predictions():
  p = _refs()['pred']
  pa, pv = p['pa'], p['pv']
  assert pa['summary'].shape == (B, 8) and pa['code_dist'].shape == (B, 16)
  assert pa['codes'].shape == pa['mask'].shape == (B, 6)  # 12 frames, 2 stacked
  assert pv['codes'].shape == (B, 8) and pv['codes'].dtype == jnp.int32
  np.testing.assert_allclose(jnp.linalg.norm(pa['summary'], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(pa['code_dist'].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(p['summary'], pa['summary'] @ pv['summary'].T, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(p['codes'], vq.cmcm_similarity(pa['code_dist'], pv['code_dist']),
                             rtol=1e-6)
  np.testing.assert_allclose(p['combined'], p['summary'] + 0.5 * p['codes'], rtol=1e-5,
                             atol=1e-5)
  assert float(jnp.abs(p['combined'] - p['summary']).max()) > 1e-3  # alpha is in use


def test_loss_parts_and_gradients_through_both_encoders():
  _, (loss, metrics, _, grads) = _step(1.0)
  ref = _refs()
  assert np.isfinite(float(loss))
  for k in ('summary', 'cmcm', 'commit'):
    assert np.isfinite(float(ref[k])) and float(ref[k]) > 0, k
  np.testing.assert_allclose(float(metrics['summary_loss']), float(ref['summary']), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['cmcm_loss']), float(ref['cmcm']), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['commitment']), float(ref['commit']), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(ref['summary'] + ref['cmcm'] + ref['commit']),
                             rtol=1e-6)
  for m in ('audio', 'visual'):
    assert _grad_norm(grads, m, 'stage') > 1e-4, m  # the transformer of each modality
    assert _grad_norm(grads, m, 'summary_proj') > 1e-4, m
    assert _grad_norm(grads, m, 'unit_proj') > 1e-4, m  # only CMCM + commitment reach it
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(x[...])).all() for x in leaves)


def test_cmcm_weight_zero_is_exactly_the_summary_loss():
  _, (loss1, metrics1, _, _) = _step(1.0)
  method, (loss0, metrics0, extra0, grads0) = _step(0.0)
  ref0 = _refs()
  assert method.alpha == 0.0  # the combined similarity is the summary's
  assert float(loss0) == float(ref0['summary']) == float(metrics0['summary_loss'])
  assert float(metrics0['summary_loss']) == float(metrics1['summary_loss'])  # same model, batch
  assert float(loss1) > float(loss0) + 0.1
  # Nothing of the VQ branch reaches the encoders: the unit projections get no gradient ...
  for m in ('audio', 'visual'):
    assert _grad_norm(grads0, m, 'unit_proj') == 0.0
    assert _grad_norm(grads0, m, 'summary_proj') > 1e-4
  # ... but the codebook still follows both modalities' units (the observer).
  np.testing.assert_allclose(extra0['codebook']['codebook'], ref0['ema_both'].codebook,
                             rtol=1e-6, atol=1e-6)


def test_ema_codebook_is_updated_from_both_modalities():
  _, (_, metrics, new_extra, _) = _step(1.0)
  ref = _refs()
  got = new_extra['codebook']
  both = ref['ema_both']
  for k in ('codebook', 'cluster_size', 'embed_sum'):
    np.testing.assert_allclose(got[k], getattr(both, k), rtol=1e-6, atol=1e-6)
  # ... the counts hold both modalities' units (not either modality's alone).
  n_units = 0.01 * (float(_batch()['audio_feats_mask'][:, ::2].sum()) + B * 8)  # (1 - decay) x
  assert float(jnp.sum(got['cluster_size'])) == pytest.approx(16 * 0.99 + n_units, rel=1e-5)
  assert 0 < float(metrics['codebook_used_audio']) <= 1
  assert 0 < float(metrics['codebook_used_visual']) <= 1


def test_host_fields_and_config_errors():
  from jaxspeech.errors import ConfigError
  from jaxspeech.methods.base import get_method

  m = get_method(small_config())
  row = {'id': '3_theo_7', 'path': shared('fsdd', 'recordings', '3_theo_7.wav'), 'label': 3,
         'image': list(range(64))}
  f = m.host_fields(row)
  spec = m.row_fields()
  assert set(f) == set(spec)
  for k, s in spec.items():
    assert f[k].shape == s.shape and f[k].dtype == s.dtype, k
  assert int(f['label']) == 3
  assert int(m.host_fields({k: v for k, v in row.items() if k != 'label'})['label']) == -1
  for key, value, match in (('cmcm_weight', -1.0, 'cmcm_weight'), ('codebook_size', 1, 'codebook'),
                            ('temperature', 0.0, 'temperature'), ('visual_frames', 7, 'rows')):
    with pytest.raises(ConfigError, match=match):
      get_method(small_config(**{key: value}))


@pytest.mark.slow  # ~15 s on 2 busy CPU cores (2 train-step compilations)
def test_a_few_steps_of_the_one_train_step_reduce_the_loss(tmp_path):
  """30 steps of the shared train step on 32 real pairs (repeated): the loss of the last steps is
  below that of the first ones, for CMCM on and its summary-only baseline."""
  manifest = write_pairs_manifest(tmp_path / 'm.jsonl')
  for weight in (1.0, 0.0):
    c = small_config(audio_frames=40, cmcm_weight=weight)
    c.data.manifest = manifest
    c.optim.learning_rate = 3e-3
    losses = short_run_losses(c, 30)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, (weight, losses)
