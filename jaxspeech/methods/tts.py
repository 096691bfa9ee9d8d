"""Text-to-speech acoustic model through the Method contract (FastSpeech-2-style; issue 17).

Rows are utterances with an `alignment` ([[phone, start_s, end_s], ...], silence `_` included:
the built-in corpus's exact MBROLA boundaries) and a `speaker`. `host_fields` turns them into
phone ids `[P]` (0 = padding), durations `[P]` in mel frames (boundaries rounded to the 62.5 Hz
frame grid, so the durations sum to the rounded end time) and a speaker id; the loss computes the
log-mel target from the batch audio inside the jitted step (`jaxspeech.ops.mel.log_mel`, so no
feature cache) and trains the model teacher-forced:

    L = mean_{valid frames, bins} |mel_hat - mel|  +  mean_{phones} (log_dur_hat - log(1 + d))^2

(FastSpeech 2 uses MSE on the mel; L1 is what most of its implementations and the vocoder's mel
loss use.) Utterances cropped by the data path (offset != 0) are left out. `config.data.normalize`
should be 'peak' (HiFi-GAN's scaling, which the vocoder is trained on).

Pruning: `config.prune` as PARP / CTC (`jaxspeech.methods.prune_spec`: one-shot magnitude
pruning of the trained model + fine-tuning with fixed masks = `mpi` with `init_from` a dense TTS
workdir; `omp` / `imp` through `python -m jaxspeech.prune`). `PRUNE_PATTERN` selects the FFT
blocks' attention and convolution kernels and the duration predictor's convolutions.

Distillation (`method.distill_weight > 0`): the teacher is the model the run starts from (with
`init_from` the dense TTS workdir: the dense model), frozen in the extra state after the first
step, before any pruning (a pruned run's first step makes no update, so these are exactly the
starting weights; an unpruned run's teacher has had one update); the loss adds
`distill_weight * |mel_hat - mel_teacher|` with the teacher's teacher-forced prediction on the
same batch (from the second step on).

Prediction: 'synthesize' `(phones [B, P], speaker [B], num_frames: int, duration_scale=1.0)
-> (log-mel [B, T, M], frame mask [B, T], durations [B, P])`.

Legend: B batch, P phones, T mel frames, M mel bins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.methods.base import Method, bucket_lengths
from jaxspeech.methods.prune_spec import PruneSpec
from jaxspeech.models.tts import FastSpeech, TtsConfig
from jaxspeech.ops import mel as mel_ops

PRUNE_PATTERN = (r'^(encoder|decoder)/\d+/(attention/(query|key|value|out)|conv1|conv2)/kernel$'
                 r'|^duration/conv\d/kernel$')


def alignment_durations(alignment, frame_rate: float) -> tuple[list[str], np.ndarray]:
  """(phones, durations in frames [P] int32) of an alignment: phone i covers frames
  round(start_i * rate) .. round(end_i * rate) - 1 (boundaries on the frame grid, so durations
  sum to round(end * rate) with no drift)."""
  phones = [str(p) for p, _, _ in alignment]
  ends = np.round(np.asarray([e for _, _, e in alignment], np.float64) * frame_rate)
  start = np.round(float(alignment[0][1]) * frame_rate) if alignment else 0.0
  dur = np.diff(np.concatenate([[start], ends])).astype(np.int32)
  return phones, np.maximum(dur, 0)


class Tts(Method):
  """FastSpeech-2-style acoustic model (see the module docstring)."""

  name = 'tts'
  encoder_path = None

  def __init__(self, config):
    super().__init__(config)
    self.mel_cfg = mel_ops.MelConfig()
    self.prune = PruneSpec.from_config(config)
    self.phones: list[str] | None = None
    self.speakers: list[str] = []
    self.max_phones = int(config.method.max_phones)

  # --- host state: phone inventory and speakers of the training rows ---------------------------

  def fit_host_state(self, rows):
    rows = [r for r in rows if r.get('alignment')]
    if not rows:
      raise ValueError('tts: no training row has an `alignment` (phones with times)')
    phones = sorted({str(p) for r in rows for p, _, _ in r['alignment']})
    speakers = sorted({str(r.get('speaker', '')) for r in rows})
    return {'phones': phones, 'speakers': speakers}

  def set_host_state(self, host_state):
    if not host_state:
      raise ValueError('tts: no host state (phones, speakers): retrain, or write host_state.json')
    self.phones = list(host_state['phones'])
    self.speakers = list(host_state['speakers'])

  def _need_state(self):
    if self.phones is None:
      self.set_host_state(self.fit_host_state(self.training_rows()))

  def phone_ids(self, phones) -> np.ndarray:
    """Phone symbols -> ids 1..V (a symbol outside the inventory raises, naming it)."""
    self._need_state()
    index = {p: i + 1 for i, p in enumerate(self.phones)}
    unknown = sorted({p for p in phones if p not in index})
    if unknown:
      raise ValueError(f'tts: phones {unknown} are not in the model inventory {self.phones}')
    return np.asarray([index[p] for p in phones], np.int32)

  def speaker_id(self, speaker: str) -> int:
    self._need_state()
    if speaker not in self.speakers:
      raise ValueError(f'tts: speaker {speaker!r} not among the training speakers '
                       f'{self.speakers}')
    return self.speakers.index(speaker)

  def model_config(self) -> TtsConfig:
    self._need_state()
    m = self.config.method
    return TtsConfig(num_phones=len(self.phones), num_speakers=len(self.speakers),
                     dim=int(m.dim), heads=int(m.heads), ffn_dim=int(m.ffn_dim),
                     ffn_kernel=int(m.ffn_kernel), encoder_layers=int(m.encoder_layers),
                     decoder_layers=int(m.decoder_layers), predictor_dim=int(m.predictor_dim),
                     dropout=float(m.dropout), n_mels=self.mel_cfg.n_mels)

  # --- data -----------------------------------------------------------------------------------

  def row_fields(self):
    p = self.max_phones
    return {'phones': jax.ShapeDtypeStruct((p,), jnp.int32),
            'durations': jax.ShapeDtypeStruct((p,), jnp.int32),
            'speaker': jax.ShapeDtypeStruct((), jnp.int32)}

  def host_fields(self, row):
    where = row.get('id', row.get('path', 'row'))
    if not row.get('alignment'):
      raise ValueError(f'{where}: tts needs an `alignment` field')
    phones, dur = alignment_durations(row['alignment'], self.mel_cfg.frame_rate)
    if len(phones) > self.max_phones:
      raise ValueError(f'{where}: {len(phones)} phones > config.method.max_phones='
                       f'{self.max_phones}')
    pad = self.max_phones - len(phones)
    return {'phones': np.pad(self.phone_ids(phones), (0, pad)),
            'durations': np.pad(dur, (0, pad)),
            'speaker': np.int32(self.speaker_id(str(row.get('speaker', ''))))}

  # --- model and loss -------------------------------------------------------------------------

  def init(self, rng):
    model = FastSpeech(self.model_config(), rngs=nnx.Rngs(params=rng))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    extra = {'prune': self.prune.init_state(params)}
    if self.distill_weight > 0:
      extra['teacher'] = params  # replaced by the starting weights at the first step
      extra['teacher_ready'] = jnp.zeros((), bool)
    return model, extra

  @property
  def distill_weight(self) -> float:
    return float(self.config.method.get('distill_weight', 0.0) or 0.0)

  def targets(self, batch):
    """(log-mel [B, T, M], frame mask [B, T], row weight [B]) of the batch audio."""
    wav, wav_mask = batch['audio'], batch['audio_mask']
    target = mel_ops.log_mel(wav, self.mel_cfg)  # [B, T, M]
    t = target.shape[1]
    lengths = jnp.sum(wav_mask, axis=-1)  # [B]
    n_audio = self.mel_cfg.num_frames(lengths)  # [B]
    n_dur = jnp.sum(batch['durations'], axis=-1)  # [B]
    frames = jnp.minimum(n_audio, n_dur)
    mask = jnp.arange(t)[None, :] < frames[:, None]
    ok = batch['valid'] & (batch['index'] >= 0) & (batch['offset'] == 0)
    return target, mask & ok[:, None], ok.astype(jnp.float32)

  def loss_fn(self, model: FastSpeech, extra_state, batch, rng):
    m = self.config.method
    target, fmask, w = self.targets(batch)
    model = self.prune.forward_model(model, extra_state['prune'])
    dropout = float(m.dropout) > 0
    rngs = nnx.Rngs(dropout=rng) if dropout else None
    pred, _, log_dur = model(batch['phones'], batch['speaker'], batch['durations'],
                             target.shape[1], deterministic=not dropout, rngs=rngs)
    fm = fmask[..., None].astype(jnp.float32)
    n_bins = jnp.maximum(jnp.sum(fm) * target.shape[-1], 1.0)
    mel_l1 = jnp.sum(jnp.abs(pred - target) * fm) / n_bins
    pmask = (batch['phones'] > 0).astype(jnp.float32) * w[:, None]
    dur_target = jnp.log1p(batch['durations'].astype(jnp.float32))
    dur_mse = jnp.sum(pmask * (log_dur - dur_target) ** 2) / jnp.maximum(jnp.sum(pmask), 1.0)
    loss = mel_l1 + float(m.duration_weight) * dur_mse
    metrics = {'mel_l1': mel_l1, 'duration_mse': dur_mse}
    if 'teacher' in extra_state:
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      nnx.replace_by_pure_dict(params, extra_state['teacher'])
      teacher = nnx.merge(graphdef, params, rest)
      t_mel, _, _ = teacher(batch['phones'], batch['speaker'], batch['durations'],
                            target.shape[1])
      distill = jnp.sum(jnp.abs(pred - jax.lax.stop_gradient(t_mel)) * fm) / n_bins
      ready = extra_state['teacher_ready'].astype(jnp.float32)
      loss = loss + self.distill_weight * ready * distill
      metrics['distill_l1'] = distill
    scale = self.prune.gradient_scale(extra_state['prune'])  # 0 at a pruned run's pruning step
    loss = scale * loss + jax.lax.stop_gradient((1.0 - scale) * loss)
    return loss, (metrics, extra_state)

  def post_update(self, params, extra_state, step):
    if 'teacher' in extra_state:  # the starting weights, before the pruning step prunes them
      ready = extra_state['teacher_ready']
      teacher = jax.tree.map(lambda t, p: jnp.where(ready, t, p), extra_state['teacher'], params)
      extra_state = {**extra_state, 'teacher': teacher, 'teacher_ready': jnp.ones((), bool)}
    params, prune_state = self.prune.post_update(params, extra_state['prune'], step,
                                                 int(self.config.train.num_steps))
    return params, {**extra_state, 'prune': prune_state}

  def predict_fns(self, model, extra_state):
    model = self.prune.forward_model(model, extra_state['prune'])

    def synthesize(phones, speaker, num_frames: int, duration_scale: float = 1.0):
      return model.synthesize(phones, speaker, num_frames, duration_scale)

    def teacher_forced(phones, speaker, durations, num_frames: int):
      mel, mask, _ = model(phones, speaker, durations, num_frames)
      return mel, mask

    return {'synthesize': synthesize, 'teacher_forced_mel': teacher_forced}

  def max_frames(self) -> int:
    return int(self.mel_cfg.num_frames(max(bucket_lengths(self.config.data))))
