"""UAVM -- a unified audio-visual model (Gong et al., IEEE SPL 2022; reference `YuanGongND/uavm`,
`src/models/mm_trans.py`, `src/traintest.py`), and its two baselines, as one Method.

Model (`jaxspeech.models.av_nets.AVClassifier`): audio frames -> audio stage, video frames ->
visual stage (modality-specific: LayerNorm, Linear, positions, `depth_i` pre-LN blocks) -> an
upper stage (LayerNorm, Linear to width `upper_dim`, `depth_s` blocks) -> masked mean over time
-> LayerNorm -> Linear -> classes.
`config.method.sharing`:
  'shared'    UAVM: the upper stage and the head are ONE set of weights used for both modalities.
  'separate'  baseline: the same sizes with a per-modality upper stage and head (nothing shared).
  'fusion'    baseline: cross-modal attention, one upper stage over the concatenated audio and
              video tokens of a pair (the reference's `FullAttTrans`).

Training (one shared trainer; this module only gives the loss): 'shared' / 'separate' train on
ONE modality per step: a Bernoulli(`audio_prob` = 0.5) draw from the step's key picks audio or
video for the whole batch (the reference's `src/traintest.py` draws the same per batch:
`random.uniform(0, 1) < a_tr_prob`), and `jax.lax.cond` runs only the chosen branch. 'fusion'
trains on both modalities of each pair every step (as the reference's `full_att_trans`).
Loss: label-smoothed softmax cross-entropy (`label_smoothing`, the reference's 0.1).

Inputs (per row, static shapes, made in the Grain workers by `host_fields`):
  audio_feats        float32 [Ta, Ca]  `audio_input='mfcc'`: 13 Kaldi MFCCs + deltas + delta-deltas
                                       (39-d, 25 ms windows at 100 Hz: `jaxspeech.methods.hubert`'s
                                       front end, computed here in numpy, the row's audio at
                                       16 kHz), normalised per clip (zero mean, unit variance per
                                       dimension over the clip's frames), centre-cropped or
                                       zero-padded to Ta = `audio_frames`. `audio_input='features'`:
                                       a `[T, Ca]` .npy file named by the row's `audio_features`
                                       (absolute path; e.g. VGGSound clip features, 30 x 1024).
  audio_feats_mask   bool    [Ta]      True = real frame
  visual_feats       float32 [Tv, Cv]  `visual_input='image_rows'`: the row's 8 x 8 `image` (grey
                                       levels / 16) read as a "visual clip" of 8 frames (its rows,
                                       top to bottom) x 8 features. `'features'`: a `[T, Cv]` .npy
                                       file named by the row's `visual_features`.
  visual_feats_mask  bool    [Tv]
  label              int32   []
The default manifest (`config.data.manifest` = '') is the paired FSDD x load_digits manifest of
`data_pipelines.av_pairs` (test speakers and test images unseen in training), built once under
the cache folder; the 'features' inputs need `config.data.manifest`.

Predictions (`predict_fns`, used by `jaxspeech/eval/av_classification.py`):
  'labels'     (batch) -> [B] int32        argmax of the audio-visual logits
  'av_logits'  (batch, modality) -> [B, K] modality 'audio' | 'visual' | 'av' (static): the
               audio-only or video-only logits, or AV = the mean of the two ('fusion': the
               fused logits; its single-modality logits see the other modality as absent)
  'av_layers'  (batch, modality) -> L+1 x [B, D or U]  every layer's masked-mean hidden state of
               one modality ('audio' | 'visual'), for the modality-classifier probe.

Legend: B batch, Ta / Tv audio / video frames, Ca / Cv their features, D width (U of the upper
stage: `upper_dim`), K classes, L = depth_i + depth_s.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspeech.errors import ConfigError
from jaxspeech.methods import hubert
from jaxspeech.methods.base import Method
from jaxspeech.models.av_nets import SHARING, AVClassifier, AVConfig, masked_mean

AUDIO_INPUTS = ('mfcc', 'features')
VISUAL_INPUTS = ('image_rows', 'features')
IMAGE_SIDE = 8  # load_digits scans are 8 x 8, grey levels 0..16
GREY_LEVELS = 16.0

# ---------------------------------------------------------------------------------------------
# The MFCC front end in numpy (host side, per clip): the same numbers as `hubert.mfcc` +
# `hubert.deltas` (tests/methods/test_uavm.py checks it), without a jit per clip length.


def mfcc_np(wav: np.ndarray) -> np.ndarray:
  """13 Kaldi MFCCs at 100 Hz of a 16 kHz clip in [-1, 1]. `[S] -> [F, 13]` (a clip shorter
  than one 25 ms window is zero-padded to one). On Kaldi's int16 scale (`hubert.mfcc(...,
  input_scale='kaldi')`), as the UAVM and CMCM numbers were measured; the clips are normalised
  per dimension afterwards (`clip_features`)."""
  w = np.asarray(wav, np.float32)
  if w.shape[0] < hubert.WIN:
    w = np.pad(w, (0, hubert.WIN - w.shape[0]))
  f = hubert.num_mfcc_frames(w.shape[0])
  idx = np.arange(f)[:, None] * hubert.HOP + np.arange(hubert.WIN)[None, :]  # [F, WIN]
  frames = w[idx] * np.float32(32768.0)
  frames = frames - frames.mean(-1, keepdims=True)
  prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=-1)
  frames = frames - np.float32(hubert.PREEMPH) * prev
  window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(hubert.WIN) / (hubert.WIN - 1))) ** 0.85
  spec = np.fft.rfft(frames * window.astype(np.float32), n=hubert.N_FFT, axis=-1)
  power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)  # [F, N_FFT/2+1]
  mel = power @ hubert.kaldi_mel_banks()
  logmel = np.log(np.maximum(mel, np.finfo(np.float32).eps))
  return (logmel @ hubert.kaldi_dct()).astype(np.float32)  # [F, 13]


def deltas_np(x: np.ndarray, width: int = 2) -> np.ndarray:
  """`hubert.deltas` on one clip: `[F, C] -> [F, C]` (edge replication)."""
  f = x.shape[0]
  padded = np.pad(x, ((width, width), (0, 0)), mode='edge')
  denom = 2.0 * sum(n * n for n in range(1, width + 1))
  out = sum(n * (padded[width + n:width + n + f] - padded[width - n:width - n + f])
            for n in range(1, width + 1))
  return (out / denom).astype(np.float32)


@functools.lru_cache(maxsize=16384)
def clip_features(path: str) -> np.ndarray:
  """39-d MFCC + deltas + delta-deltas of an audio file, normalised per clip (each dimension
  zero mean, unit variance over the clip's frames). `[F, 39]`, cached per process (read-only)."""
  from jaxspeech.audio import SAMPLE_RATE, load_audio

  c = mfcc_np(load_audio(path, SAMPLE_RATE))
  d = deltas_np(c)
  x = np.concatenate([c, d, deltas_np(d)], axis=-1)  # [F, 39]
  x = (x - x.mean(0)) / (x.std(0) + 1e-5)
  x.setflags(write=False)
  return x


def fit_frames(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """`[T, C]` -> `[n, C]` float32 and its mask `[n]`: centre-cropped when longer, zero-padded at
  the end when shorter."""
  t = x.shape[0]
  out = np.zeros((n, x.shape[1]), np.float32)
  mask = np.zeros((n,), bool)
  if t > n:
    s = (t - n) // 2
    out[:], mask[:] = x[s:s + n], True
  else:
    out[:t], mask[:t] = x, True
  return out, mask


# ---------------------------------------------------------------------------------------------


class Uavm(Method):
  name = 'uavm'
  encoder_path = None
  uses_audio = False  # the rows carry file paths; host_fields reads them (no waveform batches)

  def __init__(self, config):
    super().__init__(config)
    m = config.method
    self.sharing = str(m.sharing)
    if self.sharing not in SHARING:
      raise ConfigError(f'config.method.sharing={self.sharing!r}: one of {SHARING}')
    self.audio_input, self.visual_input = pair_inputs(m)
    self.audio_prob = float(m.audio_prob)
    if not 0.0 <= self.audio_prob <= 1.0:
      raise ConfigError(f'config.method.audio_prob={self.audio_prob}: must be in [0, 1]')
    self.label_smoothing = float(m.label_smoothing)
    try:
      self.model_config = AVConfig(
        audio_dim=int(m.audio_dim), visual_dim=int(m.visual_dim),
        audio_frames=int(m.audio_frames), visual_frames=int(m.visual_frames),
        num_classes=int(m.num_classes), dim=int(m.dim), num_heads=int(m.num_heads),
        depth_i=int(m.depth_i), depth_s=int(m.depth_s), mlp_ratio=int(m.mlp_ratio),
        upper_dim=int(m.upper_dim),
        audio_stack=int(m.audio_stack), dropout=float(m.dropout), sharing=self.sharing)
    except ValueError as e:
      raise ConfigError(f'config.method: {e}') from None

  # --- model -------------------------------------------------------------------------------------

  def init(self, rng):
    return AVClassifier(self.model_config, rngs=nnx.Rngs(params=rng)), {}

  # --- data --------------------------------------------------------------------------------------

  def row_fields(self):
    return pair_row_fields(self.model_config)

  def host_fields(self, row):
    c, m = self.model_config, self.config.method
    return pair_host_fields(row, self.audio_input, self.visual_input, c.audio_frames, c.audio_dim,
                            c.visual_frames, c.visual_dim, c.num_classes,
                            str(m.audio_features_key), str(m.visual_features_key))

  def default_manifest(self, data_config):
    return pair_default_manifest(self.config.method, data_config, self.audio_input,
                                 self.visual_input)

  # --- loss --------------------------------------------------------------------------------------

  def _ce(self, logits, batch):
    w = batch['valid'].astype(jnp.float32)  # [B]
    n = jnp.maximum(jnp.sum(w), 1.0)
    k = logits.shape[-1]
    target = optax.smooth_labels(jax.nn.one_hot(batch['label'], k), self.label_smoothing)
    ce = optax.softmax_cross_entropy(logits, target)  # [B]
    acc = jnp.sum(w * (jnp.argmax(logits, -1) == batch['label'])) / n
    return jnp.sum(w * ce) / n, acc

  def loss_fn(self, model: AVClassifier, extra_state, batch, rng):
    r_mod, r_drop = jax.random.split(rng)
    a, am = batch['audio_feats'], batch['audio_feats_mask']
    v, vm = batch['visual_feats'], batch['visual_feats_mask']
    if self.sharing == 'fusion':
      logits = model.fused_logits(a, am, v, vm, deterministic=False, rng=r_drop)  # [B, K]
      loss, acc = self._ce(logits, batch)
      return loss, ({'accuracy': acc}, extra_state)

    def branch(x, mask, modality):
      return lambda: self._ce(model.logits(x, mask, modality, deterministic=False, rng=r_drop),
                              batch)

    use_audio = jax.random.bernoulli(r_mod, self.audio_prob)  # one modality for the whole step
    loss, acc = jax.lax.cond(use_audio, branch(a, am, 'audio'), branch(v, vm, 'visual'))
    return loss, ({'accuracy': acc, 'audio_step': use_audio.astype(jnp.float32)}, extra_state)

  # --- prediction --------------------------------------------------------------------------------

  def predict_fns(self, model: AVClassifier, extra_state):
    del extra_state

    def inputs(batch, modality):
      key = {'audio': 'audio_feats', 'visual': 'visual_feats'}[modality]
      return batch[key], batch[f'{key}_mask']

    def av_logits(batch, modality):
      if modality == 'av':
        return model.av_logits(*inputs(batch, 'audio'), *inputs(batch, 'visual'))
      return model.logits(*inputs(batch, modality), modality)

    def av_layers(batch, modality):
      hs, mask = model.layers(*inputs(batch, modality), modality)
      return [masked_mean(h, mask) for h in hs]  # L+1 x [B, D] (U for the upper layers)

    return {'labels': lambda batch: jnp.argmax(av_logits(batch, 'av'), -1).astype(jnp.int32),
            'av_logits': av_logits, 'av_layers': av_layers}


def pair_row_fields(c) -> dict[str, jax.ShapeDtypeStruct]:
  """The fixed-shape fields of one audio-visual pair row for model config `c` (its
  audio/visual frames and widths)."""
  return {
    'audio_feats': jax.ShapeDtypeStruct((c.audio_frames, c.audio_dim), jnp.float32),
    'audio_feats_mask': jax.ShapeDtypeStruct((c.audio_frames,), jnp.bool_),
    'visual_feats': jax.ShapeDtypeStruct((c.visual_frames, c.visual_dim), jnp.float32),
    'visual_feats_mask': jax.ShapeDtypeStruct((c.visual_frames,), jnp.bool_),
    'label': jax.ShapeDtypeStruct((), jnp.int32),
  }


def pair_inputs(m) -> tuple[str, str]:
  """`config.method`'s (audio_input, visual_input), checked against the feature sizes."""
  audio_input, visual_input = str(m.audio_input), str(m.visual_input)
  if audio_input not in AUDIO_INPUTS:
    raise ConfigError(f'config.method.audio_input={audio_input!r}: one of {AUDIO_INPUTS}')
  if visual_input not in VISUAL_INPUTS:
    raise ConfigError(f'config.method.visual_input={visual_input!r}: one of {VISUAL_INPUTS}')
  if audio_input == 'mfcc' and int(m.audio_dim) != 39:
    raise ConfigError(f'config.method.audio_dim={int(m.audio_dim)}: MFCC frames have 39 '
                      'features (13 + deltas + delta-deltas)')
  if visual_input == 'image_rows' and (int(m.visual_dim), int(m.visual_frames)) != (
      IMAGE_SIDE, IMAGE_SIDE):
    raise ConfigError(f'config.method.visual_dim / visual_frames = {int(m.visual_dim)} / '
                      f'{int(m.visual_frames)}: image rows are 8 frames of 8 features')
  return audio_input, visual_input


def pair_host_fields(row: dict, audio_input: str, visual_input: str, audio_frames: int,
                     audio_dim: int, visual_frames: int, visual_dim: int, num_classes: int,
                     audio_features_key: str = 'audio_features',
                     visual_features_key: str = 'visual_features') -> dict[str, np.ndarray]:
  """One paired row -> the fields of the module docstring (`audio_feats`, `audio_feats_mask`,
  `visual_feats`, `visual_feats_mask`, `label`); shared by every method on paired rows
  (`jaxspeech.methods.cmcm` too)."""
  where = row.get('id', row.get('path', 'row'))
  if audio_input == 'mfcc':
    a = clip_features(str(row['path']))
  else:
    a = load_features(row, audio_features_key, audio_dim, where)
  if visual_input == 'image_rows':
    img = np.asarray(row['image'], np.float32)
    if img.size != IMAGE_SIDE * IMAGE_SIDE:
      raise ValueError(f'{where}: image has {img.size} values, need {IMAGE_SIDE ** 2}')
    v = img.reshape(IMAGE_SIDE, IMAGE_SIDE) / GREY_LEVELS  # 8 row-frames x 8 features
  else:
    v = load_features(row, visual_features_key, visual_dim, where)
  label = int(row['label'])
  if not 0 <= label < num_classes:
    raise ValueError(f'{where}: label {label} not in 0..{num_classes - 1}')
  af, am = fit_frames(a, audio_frames)
  vf, vm = fit_frames(v, visual_frames)
  return {'audio_feats': af, 'audio_feats_mask': am, 'visual_feats': vf,
          'visual_feats_mask': vm, 'label': np.int32(label)}


def pair_default_manifest(method_config, data_config, audio_input: str, visual_input: str) -> str:
  """The built-in FSDD x load_digits pairs (`data_pipelines.av_pairs`) of `method_config`'s
  `fsdd_root`, `pair_seed`, `test_speakers`, `image_test_fraction`; an error for the 'features'
  inputs, which need `config.data.manifest`."""
  m = method_config
  if (audio_input, visual_input) != ('mfcc', 'image_rows'):
    raise ConfigError(
      f'config.data.manifest: required with audio_input={audio_input!r}, visual_input='
      f'{visual_input!r} (a JSONL manifest whose rows name .npy feature files in '
      f'{str(m.audio_features_key)!r} / {str(m.visual_features_key)!r}, plus "label" and '
      '"split"); only the built-in FSDD x digits pairs need none')
  from data_pipelines.av_pairs import cached_manifest

  return cached_manifest(str(data_config.cache_dir) or None, str(m.fsdd_root) or None,
                         seed=int(m.pair_seed), test_speakers=int(m.test_speakers),
                         image_test_fraction=float(m.image_test_fraction))


def load_features(row: dict, key: str, dim: int, where: str) -> np.ndarray:
  """The `[T, dim]` float32 features of the .npy file named by `row[key]` (an absolute path)."""
  if key not in row:
    raise ValueError(f'{where}: no {key!r} (a .npy file of [T, {dim}] features)')
  path = str(row[key])
  if not os.path.isabs(path):
    raise ValueError(f'{where}: {key}={path!r} must be an absolute path')
  x = np.load(path).astype(np.float32)
  if x.ndim != 2 or x.shape[1] != dim:
    raise ValueError(f'{path}: features of shape {x.shape}, need [T, {dim}]')
  return x
