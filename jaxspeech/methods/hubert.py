"""HuBERT-style masked prediction of k-means units (Hsu et al., 2021), iteration 1.

Targets: k-means clusters of MFCC features (13 Kaldi MFCCs + deltas + delta-deltas = 39-d, 25 ms
windows every 10 ms = 100 Hz, as fairseq's `dump_mfcc_feature.py`: samples in [-1, 1] by default,
`config.method.mfcc_input_scale='kaldi'` for x 32768; deltas over each utterance's own frames,
never the batch padding), down-sampled x2 to the encoder's 50 Hz frames by taking every
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
# MFCC features as fairseq's `examples/hubert/simple_kmeans/dump_mfcc_feature.py` computes them:
# torchaudio.compliance.kaldi.mfcc (Kaldi defaults, use_energy=False, no dither) of one
# utterance's samples in [-1, 1], then torchaudio.functional.compute_deltas (win_length=5,
# replicate padding) of that utterance's [13, F] MFCCs and again of the deltas, concatenated to 39.

WIN, HOP, N_FFT = 400, 160, 512  # 25 ms, 10 ms at 16 kHz; window rounded up to a power of two
NUM_MEL, NUM_CEPS, LIFTER = 23, 13, 22.0
PREEMPH = 0.97
# What the waveform is multiplied by before the MFCCs. 'fairseq': samples as read, in [-1, 1]
# (dump_mfcc_feature.py feeds torchaudio the float waveform); 'kaldi': x 32768, the int16 scale
# of Kaldi's compute-mfcc-feats (this project's targets before Dec 2). The scale only adds
# sqrt(23) * 2 log(scale) to c0 -- except where the mel energies hit the log floor (float32
# eps): quiet frames, which then differ in c1-c12 too, so k-means on raw MFCCs moves.
MFCC_INPUT_SCALES = {'fairseq': 1.0, 'kaldi': 32768.0}


def input_scale_factor(input_scale: str) -> float:
  """`MFCC_INPUT_SCALES[input_scale]`; a ValueError naming the choices otherwise."""
  if input_scale not in MFCC_INPUT_SCALES:
    raise ValueError(f'MFCC input scale {input_scale!r}: choose one of '
                     f'{", ".join(MFCC_INPUT_SCALES)}')
  return MFCC_INPUT_SCALES[input_scale]


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


def num_mfcc_frames(num_samples):
  """MFCC frames of `num_samples` samples (Kaldi's snip_edges=True): an int for an int, an int32
  array for an array of lengths (traceable)."""
  if isinstance(num_samples, (int, np.integer)):
    return 1 + (num_samples - WIN) // HOP if num_samples >= WIN else 0
  n = jnp.asarray(num_samples, jnp.int32)
  return jnp.where(n >= WIN, 1 + (n - WIN) // HOP, 0)


def mfcc(wav: jax.Array, input_scale: str = 'fairseq') -> jax.Array:
  """13 Kaldi MFCCs (use_energy=False) at 100 Hz. `[B, S]` float in [-1, 1] -> `[B, F, 13]`.

  Frames are independent, so frame f of a zero-padded utterance equals frame f of the utterance
  alone for every f < `num_mfcc_frames(its length)`; the later frames cover padding."""
  b, s = wav.shape
  f = num_mfcc_frames(s)
  if f < 1:
    raise ValueError(f'mfcc: need at least {WIN} samples, got {s}')
  scale = input_scale_factor(input_scale)
  idx = np.arange(f)[:, None] * HOP + np.arange(WIN)[None, :]  # [F, WIN]
  frames = wav.astype(jnp.float32)[:, idx]  # [B, F, WIN]
  if scale != 1.0:
    frames = frames * scale
  frames = frames - jnp.mean(frames, axis=-1, keepdims=True)  # remove DC offset
  prev = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
  frames = frames - PREEMPH * prev  # pre-emphasis (Kaldi: x[0] - 0.97 x[0])
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN) / (WIN - 1))) ** 0.85  # povey
  frames = frames * window.astype(np.float32)
  spec = jnp.fft.rfft(frames, n=N_FFT, axis=-1)  # [B, F, N_FFT/2+1]
  power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
  mel = power @ kaldi_mel_banks()  # [B, F, NUM_MEL]
  logmel = jnp.log(jnp.maximum(mel, jnp.finfo(jnp.float32).eps))  # Kaldi's / torchaudio's floor
  return logmel @ kaldi_dct()  # [B, F, 13]


def deltas(x: jax.Array, lengths: jax.Array | None = None, width: int = 2) -> jax.Array:
  """torchaudio `compute_deltas` (win_length = 2 * width + 1, replicate padding) along axis 1 of
  every utterance's own frames: `x [B, F, C]`, `lengths [B]` valid frames (None = all F).

  d_t = sum_n n (c_{min(t+n, L-1)} - c_{max(t-n, 0)}) / (2 sum_n n^2): the window is clamped at
  the utterance's own last valid frame L-1, which is what replicate padding of the utterance
  alone gives; padding frames are never read. Static shapes (gathers with clamped indices, no
  slicing), so it jits once per padded length. Frames t >= L are set to 0."""
  f = x.shape[1]
  t = jnp.arange(f)[None, :]  # [1, F]
  if lengths is None:
    last = jnp.full((x.shape[0], 1), f - 1, jnp.int32)
  else:
    last = jnp.maximum(jnp.asarray(lengths, jnp.int32) - 1, 0)[:, None]  # [B, 1]
  denom = 2.0 * sum(n * n for n in range(1, width + 1))

  def frames_at(i):  # [B, F] frame indices -> [B, F, C]
    return jnp.take_along_axis(x, jnp.clip(i, 0, last)[..., None], axis=1)

  out = sum(n * (frames_at(t + n) - frames_at(t - n)) for n in range(1, width + 1)) / denom
  return jnp.where((t <= last)[..., None], out, 0.0) if lengths is not None else out


def mfcc_deltas(wav: jax.Array, lengths: jax.Array | None = None,
                input_scale: str = 'fairseq') -> jax.Array:
  """39-d MFCC + deltas + delta-deltas at 100 Hz, each utterance as fairseq computes it alone:
  `wav [B, S]` zero-padded, `lengths [B]` samples (None = all S) -> `[B, F, 39]`. Frames at or
  past `num_mfcc_frames(lengths)` are not the utterance's (MFCCs of padding, zero deltas)."""
  c = mfcc(wav, input_scale)  # [B, F, 13]
  n = None if lengths is None else num_mfcc_frames(lengths)  # [B] valid MFCC frames
  d = deltas(c, n)
  dd = deltas(d, n)
  return jnp.concatenate([c, d, dd], axis=-1)  # [B, F, 39]


def mfcc_targets_features(wav: jax.Array, num_frames: int, lengths: jax.Array | None = None,
                          input_scale: str = 'fairseq') -> jax.Array:
  """39-d MFCC + deltas + delta-deltas at the encoder's 50 Hz: `[B, S] -> [B, T, 39]`, deltas
  over each utterance's own `lengths [B]` samples (None = all S, no padding)."""
  feats = mfcc_deltas(wav, lengths, input_scale)  # [B, F, 39]
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
    if self.mfcc_input_scale not in MFCC_INPUT_SCALES:
      raise ConfigError(f'config.method.mfcc_input_scale={self.mfcc_input_scale!r}: choose one of '
                        f'{", ".join(MFCC_INPUT_SCALES)}')

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

  @property
  def mfcc_input_scale(self) -> str:
    # Configs (and workdirs' config.json) from before Dec 2 have no key: their k-means was fitted
    # on MFCCs of the waveform x 32768, so they keep that scale.
    return str(self.config.method.get('mfcc_input_scale', 'kaldi'))

  def target_features(self, wav: jax.Array, wav_mask: jax.Array | None = None) -> jax.Array:
    """The 39-d MFCC features of every encoder frame, `[B, S] (+ mask [B, S]) -> [B, T, 39]`;
    deltas over each utterance's valid samples (`wav_mask`; None = no padding)."""
    lengths = None if wav_mask is None else jnp.sum(wav_mask, axis=-1)  # [B] samples
    return mfcc_targets_features(wav, self.enc_cfg.num_frames(wav.shape[1]), lengths,
                                 self.mfcc_input_scale)

  def targets(self, kmeans: dict, wav: jax.Array, wav_mask: jax.Array | None = None) -> jax.Array:
    """k-means unit of every encoder frame, `[B, S] (+ mask [B, S]) -> [B, T]` int32 (no
    gradient)."""
    feats = self.target_features(wav, wav_mask)  # [B, T, 39]
    feats = (feats - kmeans['mean']) / kmeans['std']
    b, t, c = feats.shape
    ids, _ = kmeans_ops.kmeans_assign(feats.reshape(b * t, c), kmeans['centroids'])
    return jax.lax.stop_gradient(ids.reshape(b, t).astype(jnp.int32))

  def loss_fn(self, model: HubertPretrainModel, extra_state, batch, rng):
    m = self.config.method
    wav, wav_mask = batch['audio'], batch['audio_mask']  # [B, S]
    mask_rng, drop_rng = jax.random.split(rng)
    targets = self.targets(extra_state['kmeans'], wav, wav_mask)  # [B, T]
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
    feats_fn = jax.jit(self.target_features)
    rows = []
    for i, batch in zip(range(int(m.kmeans_batches)), batches):
      del i
      audio, audio_mask = np.asarray(batch['audio']), np.asarray(batch['audio_mask'])
      f = np.asarray(feats_fn(audio, audio_mask))  # [B, T, 39]
      lengths = np.asarray(self.enc_cfg.frame_lengths(np.sum(audio_mask, -1)))
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
