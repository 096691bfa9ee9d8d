"""HuBERT-style masked prediction of k-means units (Hsu et al., 2021), iteration 1.

Targets: k-means clusters of MFCC features (13 Kaldi MFCCs + deltas + delta-deltas = 39-d, 25 ms
windows every 10 ms = 100 Hz), down-sampled x2 to the encoder's 50 Hz frames by taking every
other frame (MFCC frame 2t covers samples [320t, 320t + 400), exactly the receptive field of
encoder frame t). The k-means model (centroids plus a feature mean/std: the per-dimension
mean/std with `config.method.standardize_mfcc`, the experiments' choice, or zero/one = the raw
MFCCs of fairseq's `learn_kmeans.py`) is fitted once on a sample of the corpus before training
(`prepare`) and kept in the checkpointed extra state; targets are assigned on the fly inside
the jitted step.

Loss: span masks (p=0.8, span 10; `jaxspeech.ops.masking`), masked frames replaced by the
encoder's learned `masked_spec_embed` after the feature projection, cross-entropy over masked
valid frames of logits = cos(final_proj(h_t), e_k) / 0.1 against codeword embeddings e_k
(HuBERT's head; fairseq `final_dim=256`, `logit_temp=0.1`), or a plain linear head
(`config.method.head='linear'`). Reported: masked / unmasked prediction accuracy and the
majority-class baseline of the masked targets (the accuracy of always guessing the most frequent
cluster; 1/K is the uniform chance).

Legend: B batch, S samples, F MFCC frames (100 Hz), T encoder frames (50 Hz), D width,
E final_dim, K clusters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from jaxspeech.audio import SAMPLE_RATE
from jaxspeech.errors import ConfigError
from jaxspeech.layers.attention import dense
from jaxspeech.layers.partitioning import EMBED, VOCAB, logical
from jaxspeech.methods.base import Method, encoder_config
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder
from jaxspeech.ops import kmeans as kmeans_ops
from jaxspeech.ops import masking

# ---------------------------------------------------------------------------------------------
# MFCC features (Kaldi defaults as in torchaudio.compliance.kaldi.mfcc, which HuBERT's
# `dump_mfcc_feature.py` uses; no dither).

WIN, HOP, N_FFT = 400, 160, 512  # 25 ms, 10 ms at 16 kHz; window rounded up to a power of two
NUM_MEL, NUM_CEPS, LIFTER = 23, 13, 22.0
PREEMPH = 0.97


def _mel(f):
  return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int = NUM_MEL, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                    low: float = 20.0, high: float = 0.0) -> np.ndarray:
  """Triangular filters in the Kaldi mel scale, `[n_fft // 2 + 1, num_bins]` (Nyquist bin 0)."""
  nyquist = sample_rate / 2
  high = high if high > 0 else nyquist + high
  mel_lo, mel_hi = _mel(low), _mel(high)
  delta = (mel_hi - mel_lo) / (num_bins + 1)
  fft_mel = _mel(np.arange(n_fft // 2) * sample_rate / n_fft)  # [n_fft/2]
  banks = np.zeros((n_fft // 2 + 1, num_bins), np.float32)
  for m in range(num_bins):
    left, center, right = mel_lo + m * delta, mel_lo + (m + 1) * delta, mel_lo + (m + 2) * delta
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks[:-1, m] = np.maximum(0.0, np.minimum(up, down))
  return banks


def kaldi_dct(num_bins: int = NUM_MEL, num_ceps: int = NUM_CEPS) -> np.ndarray:
  """Kaldi's orthonormal DCT-II, `[num_bins, num_ceps]`, with cepstral liftering folded in."""
  n = np.arange(num_bins)[:, None]
  k = np.arange(num_ceps)[None, :]
  dct = np.sqrt(2.0 / num_bins) * np.cos(np.pi / num_bins * (n + 0.5) * k)
  dct[:, 0] = np.sqrt(1.0 / num_bins)
  lifter = 1.0 + 0.5 * LIFTER * np.sin(np.pi * np.arange(num_ceps) / LIFTER)
  return (dct * lifter[None, :]).astype(np.float32)


def num_mfcc_frames(num_samples: int) -> int:
  return 1 + (num_samples - WIN) // HOP if num_samples >= WIN else 0


def mfcc(wav: jax.Array) -> jax.Array:
  """13 Kaldi MFCCs (use_energy=False) at 100 Hz. `[B, S]` float in [-1, 1] -> `[B, F, 13]`."""
  b, s = wav.shape
  f = num_mfcc_frames(s)
  if f < 1:
    raise ValueError(f'mfcc: need at least {WIN} samples, got {s}')
  idx = np.arange(f)[:, None] * HOP + np.arange(WIN)[None, :]  # [F, WIN]
  frames = wav.astype(jnp.float32)[:, idx] * 32768.0  # [B, F, WIN] (Kaldi works on int16 scale)
  frames = frames - jnp.mean(frames, axis=-1, keepdims=True)  # remove DC offset
  prev = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
  frames = frames - PREEMPH * prev  # pre-emphasis (Kaldi: x[0] - 0.97 x[0])
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / (WIN - 1))) ** 0.85  # povey
  frames = frames * window.astype(np.float32)
  spec = jnp.fft.rfft(frames, n=N_FFT, axis=-1)  # [B, F, N_FFT/2+1]
  power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
  mel = power @ kaldi_mel_banks()  # [B, F, NUM_MEL]
  logmel = jnp.log(jnp.maximum(mel, jnp.finfo(jnp.float32).eps))
  return logmel @ kaldi_dct()  # [B, F, 13]


def deltas(x: jax.Array, width: int = 2) -> jax.Array:
  """torchaudio `compute_deltas` (win_length=5) along axis 1 with edge replication. `[B, F, C]`."""
  f = x.shape[1]
  padded = jnp.pad(x, ((0, 0), (width, width), (0, 0)), mode='edge')
  denom = 2.0 * sum(n * n for n in range(1, width + 1))
  out = sum(n * (padded[:, width + n:width + n + f] - padded[:, width - n:width - n + f])
            for n in range(1, width + 1))
  return out / denom


def mfcc_targets_features(wav: jax.Array, num_frames: int) -> jax.Array:
  """39-d MFCC + deltas + delta-deltas at the encoder's 50 Hz: `[B, S] -> [B, T, 39]`."""
  c = mfcc(wav)  # [B, F, 13]
  d = deltas(c)
  dd = deltas(d)
  feats = jnp.concatenate([c, d, dd], axis=-1)  # [B, F, 39]
  if feats.shape[1] < 2 * num_frames - 1:
    raise ValueError(f'{feats.shape[1]} MFCC frames cannot cover {num_frames} encoder frames')
  return feats[:, 0:2 * num_frames:2]  # [B, T, 39] every other 100 Hz frame


# ---------------------------------------------------------------------------------------------
# Model: encoder + HuBERT's prediction head.


class HubertPretrainModel(nnx.Module):
  """SpeechEncoder + projection head + codeword embeddings (cosine logits) or a linear head."""

  def __init__(self, enc_cfg: EncoderConfig, num_clusters: int, final_dim: int, head: str, *,
               rngs: nnx.Rngs):
    if head not in ('cosine', 'linear'):
      raise ConfigError(f"config.method.head={head!r}: choose 'cosine' or 'linear'")
    self.head = head
    self.encoder = SpeechEncoder(enc_cfg, rngs=rngs)
    d = enc_cfg.hidden_size
    kw = dict(dtype=jnp.dtype(enc_cfg.dtype), param_dtype=jnp.float32, rngs=rngs)
    if head == 'cosine':
      self.final_proj = dense(d, final_dim, (EMBED, None), **kw)
      init = logical(nnx.initializers.normal(1.0), VOCAB, None)
      self.label_embs = nnx.Param(init(rngs.params(), (num_clusters, final_dim)))
    else:
      self.final_proj = dense(d, num_clusters, (EMBED, VOCAB), **kw)
      self.label_embs = None

  def logits(self, h: jax.Array, temperature: float) -> jax.Array:
    """`[B, T, D] -> [B, T, K]` float32."""
    z = self.final_proj(h).astype(jnp.float32)  # [B, T, E] or [B, T, K]
    if self.head == 'linear':
      return z
    e = self.label_embs[...]  # [K, E]
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-8)
    return jnp.einsum('bte,ke->btk', z, e) / temperature  # [B, T, K]


# ---------------------------------------------------------------------------------------------
# The method.


class HubertPretraining(Method):
  """Iteration-1 HuBERT: masked prediction of MFCC k-means units."""

  name = 'hubert'

  def __init__(self, config):
    super().__init__(config)
    self.enc_cfg = encoder_config(config.model)
    m = config.method
    self.num_clusters = int(m.num_clusters)
    from jaxspeech.methods.base import bucket_lengths

    self.num_samples = min(bucket_lengths(config.data))  # the shortest bucket
    self.num_frames = self.enc_cfg.num_frames(self.num_samples)
    if self.num_frames < 1:
      raise ConfigError(f'config.data.num_samples / bucket_lengths: {self.num_samples} samples '
                        'give no encoder frame')

  @property
  def _dropout(self) -> bool:
    return self.enc_cfg.has_dropout

  def init(self, rng):
    m = self.config.method
    model = HubertPretrainModel(self.enc_cfg, self.num_clusters, int(m.final_dim), m.head,
                                rngs=nnx.Rngs(params=rng))
    dim = 3 * NUM_CEPS
    extra = {
      'kmeans': {
        'centroids': jnp.zeros((self.num_clusters, dim), jnp.float32),  # [K, 39]
        'mean': jnp.zeros((dim,), jnp.float32),
        'std': jnp.ones((dim,), jnp.float32),
      }
    }
    return model, extra

  def targets(self, kmeans: dict, wav: jax.Array) -> jax.Array:
    """k-means unit of every encoder frame, `[B, S] -> [B, T]` int32 (no gradient)."""
    feats = mfcc_targets_features(wav, self.enc_cfg.num_frames(wav.shape[1]))  # [B, T, 39]
    feats = (feats - kmeans['mean']) / kmeans['std']
    b, t, c = feats.shape
    ids, _ = kmeans_ops.kmeans_assign(feats.reshape(b * t, c), kmeans['centroids'])
    return jax.lax.stop_gradient(ids.reshape(b, t).astype(jnp.int32))

  def loss_fn(self, model: HubertPretrainModel, extra_state, batch, rng):
    m = self.config.method
    wav, wav_mask = batch['audio'], batch['audio_mask']  # [B, S]
    mask_rng, drop_rng = jax.random.split(rng)
    targets = self.targets(extra_state['kmeans'], wav)  # [B, T]
    frame_mask = model.encoder.config.frame_lengths(jnp.sum(wav_mask, axis=-1))  # [B]
    t = self.enc_cfg.num_frames(wav.shape[1])  # static per bucket length
    frame_mask = jnp.arange(t)[None, :] < frame_mask[:, None]  # [B, T]
    masked = masking.span_mask(mask_rng, frame_mask, float(m.mask_prob), int(m.mask_length))
    out = model.encoder(wav, wav_mask, mask_time_indices=masked,
                        deterministic=not self._dropout,
                        rngs=drop_rng if self._dropout else None)
    logits = model.logits(out.last_hidden_state, float(m.logit_temp))  # [B, T, K]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    sel_m = (masked & out.frame_mask).astype(jnp.float32)
    sel_u = (~masked & out.frame_mask).astype(jnp.float32)
    n_m, n_u = jnp.maximum(jnp.sum(sel_m), 1.0), jnp.maximum(jnp.sum(sel_u), 1.0)
    loss_m = jnp.sum(ce * sel_m) / n_m
    loss_u = jnp.sum(ce * sel_u) / n_u
    loss = loss_m + float(m.unmasked_weight) * loss_u
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(targets, self.num_clusters) * sel_m[..., None], axis=(0, 1))
    metrics = {
      'loss_masked': loss_m,
      'loss_unmasked': loss_u,
      'acc_masked': jnp.sum(hit * sel_m) / n_m,
      'acc_unmasked': jnp.sum(hit * sel_u) / n_u,
      'majority_baseline': jnp.max(counts) / n_m,
      'masked_fraction': jnp.sum(sel_m) / jnp.maximum(jnp.sum(out.frame_mask), 1),
    }
    return loss, (metrics, extra_state)

  def prepare(self, extra_state, batches: Iterator[dict[str, Any]]):
    """Fits the MFCC k-means on `config.method.kmeans_batches` host batches (scratch runs)."""
    m = self.config.method
    feats_fn = jax.jit(lambda w: mfcc_targets_features(w, self.enc_cfg.num_frames(w.shape[1])))
    rows = []
    for i, batch in zip(range(int(m.kmeans_batches)), batches):
      del i
      audio = np.asarray(batch['audio'])
      f = np.asarray(feats_fn(audio))  # [B, T, 39]
      lengths = np.asarray(self.enc_cfg.frame_lengths(np.sum(np.asarray(batch['audio_mask']), -1)))
      valid = np.arange(f.shape[1])[None, :] < lengths[:, None]
      rows.append(f[valid])
    if not rows:
      raise ValueError('hubert.prepare: the data iterator yielded no batch for k-means')
    x = np.concatenate(rows).astype(np.float64)
    rs = np.random.RandomState(int(self.config.train.seed))
    if len(x) > int(m.kmeans_max_frames):
      x = x[rs.choice(len(x), int(m.kmeans_max_frames), replace=False)]
    if len(x) < self.num_clusters:
      raise ValueError(f'hubert.prepare: {len(x)} frames < {self.num_clusters} clusters; '
                       'raise config.method.kmeans_batches')
    if bool(m.get('standardize_mfcc', True)):  # older configs: always standardised
      mean, std = x.mean(0), x.std(0) + 1e-5
    else:  # raw MFCCs (HuBERT's recipe); targets() still applies the identity mean / std
      mean, std = np.zeros(x.shape[1]), np.ones(x.shape[1])
    z = ((x - mean) / std).astype(np.float32)
    key = jax.random.key(int(self.config.train.seed))
    fit = jax.jit(kmeans_ops.kmeans_fit, static_argnums=(2, 3))
    centroids, inertia = fit(jnp.asarray(z), None, self.num_clusters, int(m.kmeans_iters), key)
    inertia = float(inertia[-1])
    ids = np.asarray(kmeans_ops.kmeans_assign(jnp.asarray(z), centroids)[0])
    freq = np.bincount(ids, minlength=self.num_clusters) / len(ids)
    logging.info('hubert k-means: %d frames, K=%d, inertia/frame %.4f, used %d clusters, '
                 'largest %.3f, entropy %.2f nats (uniform %.2f)', len(z), self.num_clusters,
                 float(inertia) / len(z), int((freq > 0).sum()), freq.max(),
                 float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum()),
                 math.log(self.num_clusters))
    return {**extra_state, 'kmeans': {
      'centroids': jnp.asarray(centroids, jnp.float32),
      'mean': jnp.asarray(mean, jnp.float32),
      'std': jnp.asarray(std, jnp.float32),
    }}
