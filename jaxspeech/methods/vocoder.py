"""HiFi-GAN vocoder training (Kong et al., 2020): log-mel -> waveform, a GAN of two groups.

    crop [B, S] (peak-normalised audio, `config.data.normalize = 'peak'`) -> log_mel [B, T, M]
    (`jaxspeech.ops.mel`, T = 1 + S // H) -> Generator -> [B, T * H] -> trimmed to S = fake
    MPD + MSD (`jaxspeech.models.vocoder`) on [real; fake] -> logits and feature maps

Two parameter groups in the ONE shared train step (jik876/hifi-gan `train.py`, LSGAN):
  discriminator  L_D = sum_k mean (1 - D_k(real))^2 + mean D_k(fake)^2    (k: 5 periods, 3 scales)
  generator      L_G = adv * sum_k mean (1 - D_k(fake))^2
                       + fm * sum_k sum_l mean |F_kl(real) - F_kl(fake)|  (feature matching, x2)
                       + mel * mean |log_mel(real) - log_mel(fake)|       (x45)
                       + mrstft * (spectral convergence + log-magnitude L1) averaged over 3 STFT
                         resolutions (Parallel WaveGAN, Yamamoto et al. 2020; 0 = HiFi-GAN's loss)
The step gives each group the gradient of its own loss only, so one forward of the
discriminators on [real; fake] serves both losses (the fake is not detached: the generator's
share of L_D's gradient is discarded by the step, as torch's `detach()` would).

Warm-up (`config.method.adv_start_step`): before that step the generator learns from the mel
and MR-STFT terms only (the adversarial and feature-matching terms are multiplied by 0: the step
is read from the extra state) and the discriminators are not updated (`updates_at`); HiFi-GAN
itself has no warm-up (0). The discriminators still run during the warm-up: skipping them with a
`lax.cond` made every later step ~12x slower on XLA:CPU (0.7 s -> 9 s, tiny, batch 8).

Padding: crops shorter than S (utterances shorter than the segment) are zero after their end
(`audio_mask`); the fake is zeroed there too, so every term compares like with like; the mel and
STFT terms average over the utterance's own frames (1 + length // hop), and filler rows
(`valid` False) weigh 0 in every mean.

Prediction (`predict_fns()['vocode']`): log-mel [B, T, M] -> waveform [B, T * H] float32.

Legend: B batch, S samples of the crop, T mel frames, M mel bins (80), H hop (256), F STFT bins,
N logits of one sub-discriminator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.methods.base import Method
from jaxspeech.methods.prune_spec import PruneSpec
from jaxspeech.models.vocoder import (
  Generator,
  HifiGan,
  MultiPeriodDiscriminator,
  MultiScaleDiscriminator,
)
from jaxspeech.ops.mel import MelConfig, log_mel
from jaxspeech.ops.vocoder_losses import (
  feature_matching_loss,
  frame_mask,
  lsgan_discriminator_loss,
  lsgan_generator_loss,
  masked_l1,
  multi_resolution_stft_loss,
)

GROUPS = ('generator', 'discriminator')
# --- the method --------------------------------------------------------------------------------

def build_model(method_config, rng: jax.Array) -> HifiGan:
  """HifiGan from `config.method` (tuples may come back as lists from config.json)."""
  m = method_config
  rngs = nnx.Rngs(params=rng)
  tup = lambda xs: tuple(int(x) for x in xs)  # noqa: E731
  gen = Generator(
    int(m.n_mels), int(m.channels), tup(m.upsample_rates),
    tup(m.upsample_kernels) or None, tup(m.resblock_kernels),
    tuple(tup(d) for d in m.resblock_dilations), rngs=rngs)
  mpd = MultiPeriodDiscriminator(tup(m.mpd_periods), tup(m.mpd_channels), rngs=rngs)
  msd = MultiScaleDiscriminator(int(m.msd_scales), tup(m.msd_channels), tup(m.msd_groups),
                                tup(m.msd_kernels), tup(m.msd_strides), rngs=rngs)
  return HifiGan(gen, mpd, msd)


class Vocoder(Method):
  name = 'vocoder'
  encoder_path = None
  uses_audio = True

  def __init__(self, config):
    super().__init__(config)
    self.mel_config = MelConfig()
    m = config.method
    hop = 1
    for u in m.upsample_rates:
      hop *= int(u)
    if hop != self.mel_config.hop:
      raise ValueError(f'config.method.upsample_rates={tuple(m.upsample_rates)} multiply to '
                       f'{hop}; the mel hop is {self.mel_config.hop} (jaxspeech.ops.mel)')
    self.adv_start_step = int(m.adv_start_step)
    # Magnitude pruning of the generator (`config.prune`, the PARP machinery; e.g. one-shot
    # `mpi` from `init_from` = a trained vocoder, then GAN fine-tuning with the masks fixed).
    self.prune = PruneSpec.from_config(config)

  def init(self, rng):
    model = build_model(self.config.method, rng)
    extra = {'step': jnp.zeros((), jnp.int32)}
    if self.prune.enabled:  # (no key otherwise: dense workdirs keep their extra state)
      extra['prune'] = self.prune.init_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return model, extra

  def param_groups(self, params):
    return {g: {k: jax.tree.map(lambda _, same=k == g: same, v) for k, v in params.items()}
            for g in GROUPS}

  def updates_at(self, step, groups):
    out = super().updates_at(step, groups)
    if self.adv_start_step > 0:  # the discriminators wait for the warm-up to end
      out['discriminator'] = jnp.logical_and(out['discriminator'], step >= self.adv_start_step)
    return out

  def post_update(self, params, extra_state, step):
    extra_state = dict(extra_state, step=(step + 1).astype(jnp.int32))
    if self.prune.enabled:
      params, extra_state['prune'] = self.prune.post_update(
        params, extra_state['prune'], step, int(self.config.train.num_steps))
    # The loss sees the step through the extra state (it is checkpointed: resume-exact).
    return params, extra_state

  def loss_fn(self, model: HifiGan, extra_state, batch, rng):
    del rng
    m = self.config.method
    if self.prune.enabled:
      model = self.prune.forward_model(model, extra_state['prune'])
    mask = batch['audio_mask']  # [B, S]
    s = mask.shape[1]
    lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)  # [B]
    w = jnp.logical_and(batch['valid'], lengths > 0).astype(jnp.float32)  # [B]
    real = jnp.where(mask, batch['audio'], 0.0)  # [B, S]
    mel = log_mel(real, self.mel_config)  # [B, T, M], T = 1 + S // H
    fake = model.generator(mel)[:, :s]  # [B, T * H] -> [B, S]
    fake = jnp.where(mask, fake, 0.0)
    fmask = frame_mask(lengths, mel.shape[1], self.mel_config.hop)  # [B, T]
    mel_l1 = masked_l1(mel, log_mel(fake, self.mel_config), fmask, w)
    sc, mag = multi_resolution_stft_loss(real, fake, lengths, w,
                                         tuple(tuple(r) for r in m.mrstft_resolutions))
    mrstft = sc + mag

    logits, fmaps = model.discriminator(jnp.concatenate([real, fake], axis=0))  # on [2B, S]
    b = real.shape[0]
    real_logits, fake_logits = [x[:b] for x in logits], [x[b:] for x in logits]
    d_loss = lsgan_discriminator_loss(real_logits, fake_logits, w)
    g_adv = lsgan_generator_loss(fake_logits, w)
    fm = feature_matching_loss([[x[:b] for x in f] for f in fmaps],
                               [[x[b:] for x in f] for f in fmaps], w)
    # 0 during the warm-up: the generator learns from the reconstruction terms only.
    adv_on = (extra_state['step'] >= self.adv_start_step).astype(jnp.float32)
    g_loss = (adv_on * (float(m.adv_weight) * g_adv + float(m.fm_weight) * fm)
              + float(m.mel_weight) * mel_l1 + float(m.mrstft_weight) * mrstft)
    metrics = {'d_loss': d_loss, 'g_adv': g_adv, 'fm': fm, 'mel_l1': mel_l1, 'mrstft': mrstft,
               'mrstft_sc': sc, 'mrstft_mag': mag}
    if self.prune.enabled:  # no update at the pruning step
      scale = self.prune.gradient_scale(extra_state['prune'])
      g_loss, d_loss = (scale * x + jax.lax.stop_gradient((1.0 - scale) * x)
                        for x in (g_loss, d_loss))
    return {'generator': g_loss, 'discriminator': d_loss}, (metrics, extra_state)

  def predict_fns(self, model: HifiGan, extra_state):
    if self.prune.enabled:
      model = self.prune.forward_model(model, extra_state['prune'])
    return {'vocode': lambda logmel: model.generator(logmel).astype(jnp.float32)}
