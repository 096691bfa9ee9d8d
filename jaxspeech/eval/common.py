"""What the speech evaluation tasks (units, abx, speaker_probe, ctc) share: the evaluated rows and
their audio, per-utterance outputs of a prediction function over bucketed batches, 50 Hz frame
phone labels, layer indices, and the contexts of checkpoints that are not a training run.
(A training workdir's context is `jaxspeech.workdir.load_context`, which sits above both
`jaxspeech.train` and `jaxspeech.eval`: the trainer runs evaluations, so evaluation never
imports the trainer.)

    ctx = jaxspeech.workdir.load_context('WORKDIR' | 'HF_DIR' | 'mfcc')
    feats = layer_outputs(ctx, load_wavs(rows), layer_index(ctx, 'last'))  # [T_i, D] each

Checkpoints (`jaxspeech.workdir.load_context`):
  workdir  a jaxspeech training workdir: its method's model with the latest checkpoint's
           parameters and extra state (EMA teacher, codebooks, pruning masks...),
           `predict = method.predict_fns(model, extra)`.
  HF dir   an HF checkpoint folder (config.json + weights): a bare speech encoder,
           `predict = {'features'}` (`EncoderOnly`).
  'mfcc'   39-d Kaldi MFCC + deltas + delta-deltas at 50 Hz, HuBERT's iteration-1 features as
           fairseq's dump_mfcc_feature.py computes them (samples in [-1, 1]; `input_scale=
           'kaldi'` for x 32768; deltas over each utterance's own frames) (`MfccBaseline`; it
           has one feature layer, so the layer is ignored).
Inputs are fed as the model was trained (`EvalContext.normalize`, `jaxspeech.audio.scale_waveform`):
every utterance normalised to zero mean / unit variance before padding -- for a workdir as its
`config.data.normalize` says ('standard' unless set; synthesis models 'peak'), for an HF folder as
its `preprocessor_config.json`'s `do_normalize` says (normalised without one, the
Wav2Vec2FeatureExtractor default); MFCCs get the raw waveform.

Legend: B batch, S samples, T frames (50 Hz), D width.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.audio import SAMPLE_RATE, AudioError, load_audio, scale_waveform
from jaxspeech.eval.registry import EvalContext, EvalError
from jaxspeech.methods.base import Method

BUCKET = SAMPLE_RATE  # pad utterances to whole seconds: few compilations
FRAME_RATE = 50


# ---------------------------------------------------------------------------------------------
# Rows and audio.


def load_rows(manifest: str, split: str = '', need_alignment: bool = False) -> list[dict]:
  """The rows of `manifest` (only those of `split` when given)."""
  from data_pipelines.manifest import read_manifest

  if not os.path.exists(manifest):
    raise EvalError(f'--manifest {manifest}: no such file')
  rows = read_manifest(manifest)
  if split:
    rows = [r for r in rows if r.get('split') == split]
  if not rows:
    raise EvalError(f'--manifest {manifest}: no rows' + (f' with split={split!r}' if split else ''))
  if need_alignment:
    check_alignments(rows, f'--manifest {manifest}')
  return rows


def check_alignments(rows: Sequence[dict], where: str) -> None:
  missing = [r.get('id', r.get('path')) for r in rows if not r.get('alignment')]
  if missing:
    raise EvalError(f'{where}: {len(missing)} rows have no `alignment` (frame phone labels are '
                    f'needed for this task), e.g. {missing[:3]}')


def task_rows(ctx: EvalContext, manifest: str, split: str, need_alignment: bool) -> list[dict]:
  """The rows a task evaluates: those of `manifest` (the CLI's `--manifest`), or without one the
  run's own manifest (`EvalContext.rows`, evaluation during training)."""
  if manifest:
    return load_rows(manifest, split, need_alignment)
  if ctx.config is None:
    raise EvalError(f'the {ctx.method.name} checkpoint has no training manifest: give a manifest')
  try:
    rows = ctx.rows(split)
  except (ValueError, FileNotFoundError) as e:
    raise EvalError(str(e)) from None
  if need_alignment:
    check_alignments(rows, f'the rows of split {split!r}')
  return rows


def load_wavs(rows: Sequence[dict]) -> list[np.ndarray]:
  """The rows' audio; a bad file (missing, empty, NaN, wrong rate) is an EvalError naming it."""
  try:
    return [load_audio(r['path']) for r in rows]
  except AudioError as e:
    raise EvalError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Layers and per-utterance outputs.


def parse_layer(spec: str | int, num_layers: int) -> int:
  """A hidden-state index (0 = transformer input, HF `hidden_states` convention; negative counts
  from the end) or 'last' -> 0..num_layers."""
  spec = str(spec)
  if spec == 'last':
    return num_layers
  try:
    i = int(spec)
  except ValueError:
    raise EvalError(f"--layer must be an integer or 'last', got {spec!r}") from None
  j = i + num_layers + 1 if i < 0 else i
  if not 0 <= j <= num_layers:
    raise EvalError(f'--layer {spec}: out of range 0..{num_layers}')
  return j


def num_layers(ctx: EvalContext) -> int | None:
  """Transformer layers of the model's speech encoder (`Method.encoder`); None without one."""
  enc = ctx.method.encoder(ctx.model)
  return None if enc is None else int(enc.config.num_hidden_layers)


def layer_index(ctx: EvalContext, spec: str | int) -> int:
  """`parse_layer` for the context's model; a model without a speech encoder (the MFCC baseline)
  has one feature layer and ignores `spec` (0)."""
  n = num_layers(ctx)
  return 0 if n is None else parse_layer(spec, n)


def utterance_outputs(wavs: Sequence[np.ndarray], fn: Callable, *, normalize: bool | str,
                      batch_size: int = 8) -> list[np.ndarray]:
  """Runs `fn(wav [B, S], mask [B, S]) -> ([B, T, ...], frame_mask [B, T])` over length-sorted
  batches padded to whole seconds; returns one `[T_i, ...]` numpy array per utterance (its valid
  frames). Each utterance is normalised first (over its own samples, before padding) when
  `normalize`."""
  wavs = [scale_waveform(w, normalize) for w in wavs]
  out = [None] * len(wavs)
  order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    s = max(-(-max(len(wavs[i]) for i in idx) // BUCKET) * BUCKET, BUCKET)
    wav = np.zeros((batch_size, s), np.float32)  # fixed batch size: one compilation per bucket
    mask = np.zeros((batch_size, s), bool)
    for r, i in enumerate(idx):
      wav[r, :len(wavs[i])] = wavs[i]
      mask[r, :len(wavs[i])] = True
    vals, frame_mask = fn(jnp.asarray(wav), jnp.asarray(mask))
    vals, frames = np.asarray(vals), np.asarray(frame_mask).sum(-1)  # [B, T, ...], [B]
    for r, i in enumerate(idx):
      if frames[r] < 1:
        raise EvalError(f'utterance {i}: too short for one frame ({len(wavs[i])} samples)')
      out[i] = vals[r, :frames[r]]
  return out


def features_fn(ctx: EvalContext, layer: int) -> Callable:
  """`ctx.predict['features']` of layer `layer`, jitted: `(wav, mask) -> ([B, T, D], [B, T])`."""
  features = ctx.need('features')
  return jax.jit(lambda w, m: features(w, m, layer))


def layer_outputs(ctx: EvalContext, wavs: Sequence[np.ndarray], layer: int,
                  batch_size: int = 8) -> list[np.ndarray]:
  """Layer `layer`'s features of every utterance: one `[T_i, D]` array each."""
  return utterance_outputs(wavs, features_fn(ctx, layer), normalize=ctx.normalize,
                           batch_size=batch_size)


def frame_phone_labels(rows: Sequence[dict], num_frames: Sequence[int]) -> list[np.ndarray]:
  """Per-frame phone ids `[T_i]` of every row (-1 = no phone), from the rows' `alignment`: frame
  t is the phone covering its centre at 50 Hz; ids index the sorted inventory of these rows."""
  from data_pipelines import phones

  inventory = phones.inventory_from_alignments([r['alignment'] for r in rows])
  phone_to_id = {p: i for i, p in enumerate(inventory)}
  return [phones.frame_labels(r['alignment'], t, FRAME_RATE, phone_to_id)
          for r, t in zip(rows, num_frames)]


# ---------------------------------------------------------------------------------------------
# Checkpoints that are not a training run.


class EncoderOnly(Method):
  """A bare SpeechEncoder (an HF checkpoint folder): the model *is* the encoder; it predicts
  'features' only (the base `predict_fns`)."""

  name = 'hf_encoder'
  encoder_path = ()


# The MFCC frame geometry: the encoders' conv stack (20 ms hop, 25 ms window, as Kaldi's).
_MFCC_GEOMETRY = 'tiny'


def mfcc_features(wav: jax.Array, mask: jax.Array, layer: int = 0,
                  input_scale: str = 'fairseq') -> tuple[jax.Array, jax.Array]:
  """39-d MFCC + deltas at 50 Hz of the raw waveform (`jaxspeech.methods.hubert`), one frame per
  encoder frame, each utterance's deltas over its own valid samples (`mask`).
  `[B, S], [B, S] -> ([B, T, 39], frame_mask [B, T])`; `layer` is ignored."""
  from jaxspeech.methods.hubert import mfcc_targets_features
  from jaxspeech.models.speech_encoder import EncoderConfig

  del layer
  cfg = EncoderConfig.preset(_MFCC_GEOMETRY)  # only its conv geometry: 20 ms frames
  t = cfg.num_frames(wav.shape[1])
  samples = jnp.sum(mask, -1)  # [B]
  lengths = cfg.frame_lengths(samples)  # [B]
  feats = mfcc_targets_features(wav, t, samples, input_scale)  # [B, T, 39]
  return feats, jnp.arange(t)[None, :] < lengths[:, None]


class MfccBaseline(Method):
  """HuBERT's iteration-1 features (no model, no encoder): 'features' = `mfcc_features` with the
  waveform scale `input_scale` ('fairseq' = samples in [-1, 1], or 'kaldi' = x 32768)."""

  name = 'mfcc'
  encoder_path = None

  def __init__(self, config, input_scale: str = 'fairseq'):
    from jaxspeech.methods.hubert import MFCC_INPUT_SCALES

    super().__init__(config)
    if input_scale not in MFCC_INPUT_SCALES:
      raise EvalError(f'MFCC input scale {input_scale!r}: choose one of '
                      f'{", ".join(MFCC_INPUT_SCALES)}')
    self.input_scale = input_scale

  def predict_fns(self, model, extra_state):
    del model, extra_state
    scale = self.input_scale

    def features(wav, mask, layer=0):
      return mfcc_features(wav, mask, layer, scale)

    return {'features': features}


def mfcc_context(input_scale: str = 'fairseq') -> EvalContext:
  """The `mfcc` baseline's context; `input_scale` as `MfccBaseline`."""
  method = MfccBaseline(None, input_scale)
  return EvalContext(config=None, method=method, model=None, extra={},
                     predict=method.predict_fns(None, {}), normalize=False)


def encoder_context(encoder, normalize: bool = True) -> EvalContext:
  """A context for a bare SpeechEncoder (HF folder, or any encoder in memory)."""
  method = EncoderOnly(None)
  return EvalContext(config=None, method=method, model=encoder, extra={},
                     predict=method.predict_fns(encoder, {}), normalize=normalize)
