"""HuBERT-style pretraining pieces: MFCC features, frame alignment, targets, loss metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.methods import hubert
from tests.train.common import small_config


def _wav(b=2, s=8000, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(s) / 16000
  tone = np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1250 * t)
  return (tone[None] + 0.1 * rng.standard_normal((b, s))).astype(np.float32)


def test_mfcc_shape_and_gain_only_moves_c0():
  wav = _wav()
  c = np.asarray(hubert.mfcc(jnp.asarray(wav)))
  assert c.shape == (2, 1 + (8000 - 400) // 160, 13)
  c2 = np.asarray(hubert.mfcc(jnp.asarray(2.0 * wav)))
  # x2 gain adds log(4) to every log-mel bin; the orthonormal DCT maps a constant to c0 only:
  # c0 grows by sqrt(23) * log(4) (lifter weight of c0 is 1), the other cepstra stay put.
  np.testing.assert_allclose(c2[..., 0] - c[..., 0], np.sqrt(23) * np.log(4.0), rtol=1e-4)
  np.testing.assert_allclose(c2[..., 1:], c[..., 1:], atol=2e-3)


def test_deltas_of_a_ramp_are_its_slope():
  x = jnp.arange(20, dtype=jnp.float32)[None, :, None] * 0.5  # [1, 20, 1], slope 0.5
  d = np.asarray(hubert.deltas(x))
  np.testing.assert_allclose(d[0, 2:-2, 0], 0.5, rtol=1e-6)
  assert abs(d[0, 0, 0] - 0.5) > 0.05  # edges use replicated frames (torchaudio behaviour)


def test_target_features_align_with_encoder_frames():
  from jaxspeech.methods.base import encoder_config

  cfg = encoder_config(small_config().model)
  for s in (400, 719, 8000, 16000, 16321):
    t = cfg.num_frames(s)
    f = hubert.mfcc_targets_features(jnp.zeros((1, s)), t)
    assert f.shape == (1, t, 39)
    # MFCC frame 2t starts at sample 320t: the encoder frame's receptive field start.
    assert hubert.num_mfcc_frames(s) >= 2 * t - 1


def test_loss_metrics_and_masking():
  from jaxspeech.methods.base import get_method
  from jaxspeech.ops.masking import num_masked_frames
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  config = small_config()
  method = get_method(config)
  setup = step_lib.build_setup(config, method, partitioning.create_mesh(config.mesh))
  state = step_lib.create_train_state(setup, jax.random.key(0))
  rng = np.random.default_rng(0)
  feats = np.asarray(hubert.mfcc_targets_features(jnp.asarray(_wav(4, 8000)),
                                                  method.num_frames)).reshape(-1, 39)
  km = {'centroids': jnp.asarray(feats[rng.choice(len(feats), 20, replace=False)]),
        'mean': jnp.zeros(39), 'std': jnp.ones(39)}
  extra = {'kmeans': km}
  audio = _wav(4, 8000)
  mask = np.ones((4, 8000), bool)
  mask[1, 5000:] = False  # a padded utterance
  batch = {'audio': jnp.asarray(audio * mask), 'audio_mask': jnp.asarray(mask)}
  from flax import nnx

  def f(params):
    model = nnx.merge(setup.graphdef, params, state['model_state'])
    return method.loss_fn(model, extra, batch, jax.random.key(1))

  (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state['params'])
  lengths = np.asarray(method.enc_cfg.frame_lengths(jnp.asarray(mask.sum(-1))))
  want_frac = num_masked_frames(jnp.asarray(lengths)).sum() / lengths.sum()
  np.testing.assert_allclose(float(metrics['masked_fraction']), float(want_frac), rtol=1e-6)
  for k in ('acc_masked', 'acc_unmasked', 'majority_baseline'):
    assert 0.0 <= float(metrics[k]) <= 1.0
  assert np.isfinite(float(loss)) and float(loss) > 0
  np.testing.assert_allclose(float(loss), float(metrics['loss_masked']) + 0.5 *
                             float(metrics['loss_unmasked']), rtol=1e-6)  # tiny: weight 0.5
  gn = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads)))
  assert np.isfinite(gn) and gn > 0


@pytest.mark.parametrize('standardize', [True, False])
def test_prepare_kmeans_raw_or_standardised(standardize):
  """`prepare` fits the MFCC k-means on z-scored features (mean/std stored) or on the raw ones
  (identity mean/std), and targets() assigns frames to the nearest centroid in that space."""
  config = small_config()
  config.method.standardize_mfcc = standardize
  config.method.kmeans_batches = 3
  method = hubert.HubertPretraining(config)
  batches = [{'audio': _wav(4, 8000, seed=i), 'audio_mask': np.ones((4, 8000), bool)}
             for i in range(3)]
  _, extra = method.init(jax.random.key(0))
  km = method.prepare(extra, iter(batches))['kmeans']
  feats = np.concatenate([np.asarray(hubert.mfcc_targets_features(jnp.asarray(b['audio']),
                                                                  method.num_frames))
                          for b in batches]).reshape(-1, 39)
  if standardize:
    np.testing.assert_allclose(np.asarray(km['mean']), feats.mean(0), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(km['std']), 1.0)
  else:
    np.testing.assert_array_equal(np.asarray(km['mean']), 0.0)
    np.testing.assert_array_equal(np.asarray(km['std']), 1.0)
  z = (feats[:16] - np.asarray(km['mean'])) / np.asarray(km['std'])
  c = np.asarray(km['centroids'])
  want = np.argmin(((z[:, None] - c[None]) ** 2).sum(-1), -1)
  got = np.asarray(method.targets(km, jnp.asarray(batches[0]['audio'])))[0, :16]
  np.testing.assert_array_equal(got, want)


def test_targets_of_a_padded_utterance_are_its_own():
  """targets() with the batch's audio mask: a padded utterance gets the units of its own frames
  (the deltas of its last frames never read the padding); before Dec 2 they differed."""
  config = small_config()
  method = hubert.HubertPretraining(config)
  assert method.mfcc_input_scale == 'fairseq'
  wav = _wav(2, 4800, seed=3)
  wav[1, 3000:] = 0.0
  mask = np.ones((2, 4800), bool)
  mask[1, 3000:] = False
  feats = np.asarray(method.target_features(jnp.asarray(wav), jnp.asarray(mask)))  # [2, T, 39]
  t1 = method.enc_cfg.num_frames(3000)
  alone = np.asarray(hubert.mfcc_targets_features(jnp.asarray(wav[1:, :3000]), t1))[0]
  np.testing.assert_allclose(feats[1, :t1], alone, rtol=1e-4, atol=2e-3)
  km = {'centroids': jnp.asarray(alone[::2]), 'mean': jnp.zeros(39), 'std': jnp.ones(39)}
  units = np.asarray(jax.jit(method.targets)(km, jnp.asarray(wav), jnp.asarray(mask)))
  np.testing.assert_array_equal(units[1, :t1:2], np.arange(len(alone[::2])))


def test_mfcc_input_scale_config():
  from jaxspeech.errors import ConfigError

  config = small_config()
  config.method.mfcc_input_scale = 'kaldi'
  assert hubert.HubertPretraining(config).mfcc_input_scale == 'kaldi'
  config.method.mfcc_input_scale = 'int16'
  with pytest.raises(ConfigError, match='mfcc_input_scale'):
    hubert.HubertPretraining(config)
  # A config (or a workdir's config.json) from before the key: its k-means saw x 32768.
  config = small_config()
  config.unlock()
  del config.method['mfcc_input_scale']
  assert hubert.HubertPretraining(config).mfcc_input_scale == 'kaldi'
