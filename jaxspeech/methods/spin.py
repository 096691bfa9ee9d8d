"""Spin: speaker-invariant clustering by swapped prediction (Chang, Liu, Glass, Interspeech 2023).

Reference: vectominist/spin (`src/model/spin.py`, `src/nn/swav_vq_dis.py`, `config/spin.yaml`);
the equations are restated in `../shared/SEEDS.md` §1.

Each utterance is seen twice: the original and a speaker-perturbed copy of the same length
(`config.method.perturb`):

  'jax'    `jaxspeech.ops.perturb.perturb_batch` inside the jitted step (the accelerator does it;
           no Praat needed). The view is made from the (normalised) training audio: scaled to
           peak 0.5, perturbed, then re-normalised to zero mean / unit variance over valid
           samples, as the pipeline normalises its inputs.
  'praat'  Praat "Change gender" + random EQ in the Grain workers: the batch must carry
           `audio_perturbed` (`data_pipelines.pipeline.make_dataset(perturb='praat')`).

Both views go through the encoder in one call (batch 2B). The encoder is frozen but for its top
`config.method.trainable_layers` transformer blocks (spin.yaml: `freeze_layers: [pos, 0..10]` of
HuBERT-base's 12 layers; the freezing itself is `config.train.trainable`, see
`trainable_regex`). Head: Linear D -> E (spin.yaml `pred_head.hid_dims: [256]`), L2-normalised;
codebook C [K, E] with unit rows (renormalised after every step in `post_update`);
logits = z Cᵀ. Targets: Sinkhorn-Knopp (ε, iterations; marginals over the valid frames of the
whole global batch) of each view's logits, no gradient; loss: swapped prediction at temperature
τ over valid frames (`jaxspeech.ops.swapped_prediction.spin_loss`). Units at inference:
argmax(z Cᵀ) (`SpinModel.units`, the 'units' prediction).

Legend: B batch, S samples, T frames (50 Hz), D encoder width, E head width, K codewords.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.errors import ConfigError
from jaxspeech.layers.attention import dense
from jaxspeech.layers.partitioning import EMBED, VOCAB, logical
from jaxspeech.methods.base import Method, encoder_config
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder
from jaxspeech.ops import perturb as perturb_ops
from jaxspeech.ops import swapped_prediction as sp

PERTURB_BACKENDS = ('jax', 'praat')


def trainable_regex(num_layers: int, trainable_layers: int) -> str:
  """`config.train.trainable` for Spin: the head, the codebook and the top `trainable_layers`
  transformer blocks of an encoder with `num_layers` blocks (paths as in `SpinModel`)."""
  if not 0 <= trainable_layers <= num_layers:
    raise ValueError(f'trainable_layers={trainable_layers} not in 0..{num_layers}')
  top = '|'.join(str(i) for i in range(num_layers - trainable_layers, num_layers))
  layers = f'|^encoder/encoder/layers/({top})/' if trainable_layers else ''
  return f'^head/|^codebook${layers}'


class SpinModel(nnx.Module):
  """SpeechEncoder + Linear head (D -> E) + codebook [K, E] (a parameter, unit rows)."""

  def __init__(self, enc_cfg: EncoderConfig, head_dim: int, codebook_size: int, *,
               rngs: nnx.Rngs):
    self.encoder = SpeechEncoder(enc_cfg, rngs=rngs)
    self.head = dense(enc_cfg.hidden_size, head_dim, (EMBED, None),
                      dtype=jnp.dtype(enc_cfg.dtype), param_dtype=jnp.float32, rngs=rngs)
    def unit_rows(key, shape, dtype=jnp.float32):
      return sp.normalize_codebook(jax.random.normal(key, shape, dtype))

    init = logical(unit_rows, VOCAB, None)
    self.codebook = nnx.Param(init(rngs.params(), (codebook_size, head_dim)))

  def project(self, hidden: jax.Array) -> jax.Array:
    """`[B, T, D] -> [B, T, E]` float32, L2-normalised."""
    return sp.l2_normalize(self.head(hidden).astype(jnp.float32))

  def units(self, wav: jax.Array, wav_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Discrete units argmax(z Cᵀ): `[B, S] -> ([B, T] int32, frame_mask [B, T])`."""
    out = self.encoder(wav, wav_mask)
    logits = sp.cosine_logits(self.project(out.last_hidden_state), self.codebook[...])
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), out.frame_mask


def perturb_view(key: jax.Array, audio: jax.Array, mask: jax.Array) -> jax.Array:
  """The JAX speaker-perturbed view of normalised audio, re-normalised. `[B, S] -> [B, S]`."""
  m = mask.astype(jnp.float32)
  peak = jnp.max(jnp.abs(audio) * m, axis=-1, keepdims=True)  # [B, 1]
  x = 0.5 * audio / jnp.maximum(peak, 1e-6)  # perturb_batch clips to [-1, 1]
  y = perturb_ops.perturb_batch(key, x, mask)  # [B, S]
  n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
  mean = jnp.sum(y * m, axis=-1, keepdims=True) / n
  var = jnp.sum(jnp.square(y - mean) * m, axis=-1, keepdims=True) / n
  return jnp.where(mask, (y - mean) / jnp.sqrt(var + 1e-7), 0.0)


class Spin(Method):
  """Swapped prediction between an utterance and its speaker-perturbed copy."""

  name = 'spin'

  def __init__(self, config):
    super().__init__(config)
    m = config.method
    self.enc_cfg = encoder_config(config.model)
    if m.perturb not in PERTURB_BACKENDS:
      raise ConfigError(f'config.method.perturb={m.perturb!r}: choose one of {PERTURB_BACKENDS}')
    if m.perturb == 'praat' and config.data.get('perturb', '') != 'praat':
      raise ValueError("config.method.perturb='praat' needs config.data.perturb='praat' (the "
                       'Grain workers make the perturbed view)')
    self.codebook_size = int(m.codebook_size)
    self.head_dim = int(m.head_dim)
    want = trainable_regex(self.enc_cfg.num_hidden_layers, int(m.trainable_layers))
    if str(config.train.trainable) != want:
      # Layer freezing is config.train.trainable (read by the shared optimizer); keep it and
      # config.method.trainable_layers from silently disagreeing.
      raise ConfigError(f'config.train.trainable={config.train.trainable!r} does not match '
                        f'config.method.trainable_layers={int(m.trainable_layers)} of a '
                        f'{self.enc_cfg.num_hidden_layers}-layer encoder: set it to {want!r} '
                        '(jaxspeech.methods.spin.trainable_regex)')

  @property
  def _dropout(self) -> bool:
    return self.enc_cfg.has_dropout

  def init(self, rng):
    model = SpinModel(self.enc_cfg, self.head_dim, self.codebook_size, rngs=nnx.Rngs(params=rng))
    return model, {}

  def views(self, batch, rng) -> jax.Array:
    """The perturbed view `[B, S]` (no gradient)."""
    if self.config.method.perturb == 'jax':
      view = perturb_view(rng, batch['audio'], batch['audio_mask'])
    else:
      if 'audio_perturbed' not in batch:
        raise ValueError("config.method.perturb='praat' needs batch['audio_perturbed'] "
                         "(make_dataset(perturb='praat'))")
      view = batch['audio_perturbed']
    return jax.lax.stop_gradient(view.astype(batch['audio'].dtype))

  def loss_fn(self, model: SpinModel, extra_state, batch, rng):
    m = self.config.method
    wav, wav_mask = batch['audio'], batch['audio_mask']  # [B, S]
    b = wav.shape[0]
    view_rng, drop_rng = jax.random.split(rng)
    wav2 = self.views(batch, view_rng)  # [B, S]
    both = jnp.concatenate([wav, wav2], axis=0)  # [2B, S]
    both_mask = jnp.concatenate([wav_mask, wav_mask], axis=0)
    out = model.encoder(both, both_mask, deterministic=not self._dropout,
                        rngs=drop_rng if self._dropout else None)
    z = model.project(out.last_hidden_state)  # [2B, T, E]
    frame_mask = out.frame_mask[:b]  # [B, T]; equal lengths, so equal for both views
    res = sp.spin_loss(z[:b], z[b:], model.codebook[...], frame_mask, float(m.epsilon),
                       int(m.sinkhorn_iters), float(m.temperature))
    metrics = {
      'swap_accuracy': res.accuracy,
      'code_perplexity': res.code_perplexity,
      'valid_frames': jnp.sum(frame_mask, dtype=jnp.float32),
    }
    return res.loss, (metrics, extra_state)

  def post_update(self, params, extra_state, step):
    del step
    return dict(params, codebook=sp.normalize_codebook(params['codebook'])), extra_state

  def predict_fns(self, model: SpinModel, extra_state):
    """The base 'features' plus 'units' (`SpinModel.units`, from the last layer only)."""
    fns = super().predict_fns(model, extra_state)
    last = self.enc_cfg.num_hidden_layers

    def units(wav, mask, layer=None):
      if layer is not None and layer != last:
        raise ValueError(f'spin: units come from the last layer ({last}), not layer {layer}')
      return model.units(wav, mask)

    fns['units'] = units
    return fns
