"""HiFi-GAN (Kong et al., 2020): a mel-to-waveform generator and its two discriminators, Flax NNX.

Generator  log-mel [B, T, M] -> conv_pre (k 7) -> for each upsampling rate u:
           LeakyReLU(0.1) -> ConvTranspose (kernel 2u, stride u: length x u exactly) -> MRF (the
           mean of one ResBlock1 per (kernel, dilations): three pairs of dilated conv + conv,
           LeakyReLU before each, residual) -> LeakyReLU -> conv_post (k 7) -> tanh -> [B, T * H].
           H = prod(rates) must equal the mel hop (256 at 16 kHz, `jaxspeech.ops.mel.MelConfig`):
           every layer keeps or multiplies the length exactly, so T frames give T * H samples
           with no trimming (frame t of `log_mel` is centred on sample t * H; a crop of S samples
           has 1 + S // H frames, and the method trims the T * H samples back to S).
           Channels halve at each upsampling (`channels // 2**(i+1)`), as in jik876/hifi-gan.
MPD        multi-period discriminator: for each period p (2, 3, 5, 7, 11) the waveform is
           reflect-padded to a multiple of p and folded to [B, S/p, p, 1]; 2-D convs with
           (k, 1) kernels, stride (3, 1), see only samples p apart.
MSD        multi-scale discriminator: grouped 1-D convs on the waveform, on it average-pooled
           once and twice (kernel 4, stride 2, padding 2, zeros counted: torch AvgPool1d).
Every discriminator returns (logits [B, N], feature maps: every conv's output after its
LeakyReLU, and the logits map) -- the LSGAN and feature-matching losses of
`jaxspeech.methods.vocoder` read both.

Differences from the reference (jik876/hifi-gan `models.py`), on purpose:
* No weight normalisation (the reference wraps every conv in `weight_norm`, the first MSD
  scale in `spectral_norm`). Weight norm only reparameterises the weights (its initial weights
  equal the plain ones), so the model computes the same function family; training dynamics
  differ a little. Plain kernels keep the parameter tree simple for magnitude pruning (issue 17).
* Channels-last layout (`nnx.Conv`: [B, S, C]); channel counts (and the MSD's kernels and
  groups) are arguments so that a CPU-size model (`experiments/vocoder.py:tiny`) uses the same
  code as HiFi-GAN V1 (`paper`). On XLA:CPU, grouped and long (41-tap) strided convs are the
  slowest part of a step by far (their gradients run at ~1/20 of a plain conv's FLOP rate), so
  `tiny` uses ungrouped 11-tap MSD convs; `paper` keeps the reference's.
Initialisation follows the reference: N(0, 0.01) for the generator's upsampling, residual and
output convs (`init_weights`), torch's default (uniform +-1/sqrt(fan_in)) for `conv_pre` and the
discriminators.

Legend: B batch, T mel frames, M mel bins, H hop (samples per frame), S samples, C channels,
p period, N logits per utterance (depends on S and the discriminator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxspeech.layers.partitioning import CONV_IN, CONV_OUT, KERNEL, logical

LRELU_SLOPE = 0.1  # HiFi-GAN's LRELU_SLOPE, every LeakyReLU but the one before conv_post
V1_RESBLOCK_KERNELS = (3, 7, 11)
V1_RESBLOCK_DILATIONS = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
MPD_PERIODS = (2, 3, 5, 7, 11)
MPD_CHANNELS = (32, 128, 512, 1024, 1024)
MSD_CHANNELS = (128, 128, 256, 512, 1024, 1024, 1024)
MSD_GROUPS = (1, 4, 16, 16, 16, 16, 1)
MSD_KERNELS = (15, 41, 41, 41, 41, 41, 5)
MSD_STRIDES = (1, 2, 2, 4, 4, 1, 1)

# A list of per-layer feature maps of one discriminator (each [B, ..., C]).
FeatureMaps = list[jax.Array]


def _torch_default(fan_in: int):
  """torch Conv default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for weights and
  biases."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


_hifigan_normal = nnx.initializers.normal(0.01)  # hifi-gan utils.init_weights


def _conv(c_in: int, c_out: int, kernel: int | tuple[int, int], *, stride=1, dilation=1,
          padding, groups: int = 1, init='torch', rngs: nnx.Rngs) -> nnx.Conv:
  """`nnx.Conv` with torch-like initialisation and logical axis names on the kernel."""
  ks = (kernel,) if isinstance(kernel, int) else tuple(kernel)
  fan_in = (c_in // groups) * math.prod(ks)
  w_init = _torch_default(fan_in) if init == 'torch' else _hifigan_normal
  names = (KERNEL,) * len(ks) + (CONV_IN, CONV_OUT)
  return nnx.Conv(c_in, c_out, ks, strides=stride, kernel_dilation=dilation, padding=padding,
                  feature_group_count=groups, kernel_init=logical(w_init, *names),
                  bias_init=logical(_torch_default(fan_in), CONV_OUT), rngs=rngs)


def _same(kernel: int, dilation: int = 1) -> list[tuple[int, int]]:
  """Symmetric padding keeping the length of an odd kernel (hifi-gan `get_padding`)."""
  p = (kernel * dilation - dilation) // 2
  return [(p, p)]


def upsample_padding(kernel: int, rate: int) -> tuple[int, int]:
  """Padding of the stride-`rate` transposed conv so that L samples give exactly L * rate.

  `lax.conv_transpose` pads the `rate`-dilated input ((L - 1) * rate + 1 samples) by (lo, hi)
  and runs a VALID conv: out = (L - 1) * rate + 1 + lo + hi - kernel + 1, so lo + hi =
  kernel + rate - 2. lo = kernel - 1 - (kernel - rate) // 2 is torch's ConvTranspose1d with
  padding (kernel - rate) // 2 (the reference's), which for kernel = 2 * rate is already exact."""
  lo = kernel - 1 - (kernel - rate) // 2
  return lo, kernel + rate - 2 - lo


class ResBlock1(nnx.Module):
  """HiFi-GAN ResBlock1: x + conv_d1(lrelu(conv_d(lrelu(x)))) for each dilation d. [B, S, C] ->
  [B, S, C]."""

  def __init__(self, channels: int, kernel: int, dilations: Sequence[int], *, rngs: nnx.Rngs):
    self.convs1 = nnx.List([_conv(channels, channels, kernel, dilation=d,
                                  padding=_same(kernel, d), init='normal', rngs=rngs)
                            for d in dilations])
    self.convs2 = nnx.List([_conv(channels, channels, kernel, padding=_same(kernel),
                                  init='normal', rngs=rngs) for _ in dilations])

  def __call__(self, x: jax.Array) -> jax.Array:
    for c1, c2 in zip(self.convs1, self.convs2):
      h = c1(jax.nn.leaky_relu(x, LRELU_SLOPE))
      x = x + c2(jax.nn.leaky_relu(h, LRELU_SLOPE))
    return x


class Generator(nnx.Module):
  """log-mel [B, T, M] -> waveform [B, T * prod(upsample_rates)] in (-1, 1)."""

  def __init__(self, n_mels: int = 80, channels: int = 512,
               upsample_rates: Sequence[int] = (8, 8, 2, 2),
               upsample_kernels: Sequence[int] | None = None,
               resblock_kernels: Sequence[int] = V1_RESBLOCK_KERNELS,
               resblock_dilations: Sequence[Sequence[int]] = V1_RESBLOCK_DILATIONS,
               *, rngs: nnx.Rngs):
    rates = tuple(int(u) for u in upsample_rates)
    kernels = tuple(int(k) for k in upsample_kernels) if upsample_kernels else tuple(
      2 * u for u in rates)  # HiFi-GAN V1-V3: kernel = 2 x rate
    if len(kernels) != len(rates):
      raise ValueError(f'upsample_kernels {kernels} and upsample_rates {rates} differ in length')
    if len(resblock_kernels) != len(resblock_dilations):
      raise ValueError('resblock_kernels and resblock_dilations differ in length')
    if channels % 2 ** len(rates):
      raise ValueError(f'channels={channels} must be divisible by 2**{len(rates)} (halved at '
                       'each upsampling)')
    self.hop = math.prod(rates)
    self.conv_pre = _conv(n_mels, channels, 7, padding=_same(7), rngs=rngs)
    ups, mrfs = [], []
    for i, (u, k) in enumerate(zip(rates, kernels)):
      c_in, c_out = channels // 2 ** i, channels // 2 ** (i + 1)
      fan_in = c_in * k
      ups.append(nnx.ConvTranspose(
        c_in, c_out, (k,), strides=(u,), padding=[upsample_padding(k, u)],
        kernel_init=logical(_hifigan_normal, KERNEL, CONV_IN, CONV_OUT),
        bias_init=logical(_torch_default(fan_in), CONV_OUT), rngs=rngs))
      mrfs.append(nnx.List([ResBlock1(c_out, rk, rd, rngs=rngs)
                            for rk, rd in zip(resblock_kernels, resblock_dilations)]))
    self.ups, self.mrfs = nnx.List(ups), nnx.List(mrfs)
    self.conv_post = _conv(channels // 2 ** len(rates), 1, 7, padding=_same(7), init='normal',
                           rngs=rngs)

  def __call__(self, logmel: jax.Array) -> jax.Array:
    x = self.conv_pre(logmel)  # [B, T, C]
    for up, mrf in zip(self.ups, self.mrfs):
      x = up(jax.nn.leaky_relu(x, LRELU_SLOPE))  # [B, T * u_1 ... u_i, C / 2^i]
      x = sum(block(x) for block in mrf) / len(mrf)  # multi-receptive-field fusion
    # The reference's last LeakyReLU is torch's default slope 0.01, not LRELU_SLOPE.
    x = self.conv_post(jax.nn.leaky_relu(x, 0.01))  # [B, T * H, 1]
    return jnp.tanh(x[..., 0])  # [B, T * H]


class PeriodDiscriminator(nnx.Module):
  """One MPD sub-discriminator: waveform [B, S] -> (logits [B, N], feature maps)."""

  def __init__(self, period: int, channels: Sequence[int] = MPD_CHANNELS, kernel: int = 5,
               stride: int = 3, *, rngs: nnx.Rngs):
    self.period = int(period)
    c = (1, *channels)
    pad = [((kernel - 1) // 2, (kernel - 1) // 2), (0, 0)]
    # All but the last conv stride 3 along the folded time axis; the last keeps the length.
    self.convs = nnx.List([
      _conv(c[i], c[i + 1], (kernel, 1), stride=(stride if i < len(channels) - 1 else 1, 1),
            padding=pad, rngs=rngs) for i in range(len(channels))])
    self.conv_post = _conv(c[-1], 1, (3, 1), padding=[(1, 1), (0, 0)], rngs=rngs)

  def __call__(self, wav: jax.Array) -> tuple[jax.Array, FeatureMaps]:
    b, s = wav.shape
    p = self.period
    if s % p:  # the reference pads by reflection to a whole number of periods
      wav = jnp.pad(wav, ((0, 0), (0, p - s % p)), mode='reflect')
    x = wav.reshape(b, -1, p, 1)  # [B, S/p, p, 1]
    fmaps = []
    for conv in self.convs:
      x = jax.nn.leaky_relu(conv(x), LRELU_SLOPE)  # [B, ~S/p/3^i, p, C_i]
      fmaps.append(x)
    x = self.conv_post(x)  # [B, S', p, 1]
    fmaps.append(x)
    return x.reshape(b, -1), fmaps


class ScaleDiscriminator(nnx.Module):
  """One MSD sub-discriminator: waveform [B, S] -> (logits [B, N], feature maps)."""

  def __init__(self, channels: Sequence[int] = MSD_CHANNELS, groups: Sequence[int] = MSD_GROUPS,
               kernels: Sequence[int] = MSD_KERNELS, strides: Sequence[int] = MSD_STRIDES,
               *, rngs: nnx.Rngs):
    if not len(channels) == len(groups) == len(kernels) == len(strides):
      raise ValueError('ScaleDiscriminator: channels, groups, kernels and strides must have one '
                       f'entry per layer, got {len(channels)}, {len(groups)}, {len(kernels)}, '
                       f'{len(strides)}')
    c = (1, *channels)
    self.convs = nnx.List([
      _conv(c[i], c[i + 1], k, stride=st, padding=_same(k), groups=g, rngs=rngs)
      for i, (k, st, g) in enumerate(zip(kernels, strides, groups))])
    self.conv_post = _conv(c[-1], 1, 3, padding=_same(3), rngs=rngs)

  def __call__(self, wav: jax.Array) -> tuple[jax.Array, FeatureMaps]:
    x = wav[..., None]  # [B, S, 1]
    fmaps = []
    for conv in self.convs:
      x = jax.nn.leaky_relu(conv(x), LRELU_SLOPE)  # [B, S / prod(strides[:i+1]), C_i]
      fmaps.append(x)
    x = self.conv_post(x)  # [B, S', 1]
    fmaps.append(x)
    return x.reshape(x.shape[0], -1), fmaps


def avg_pool_4_2(wav: jax.Array) -> jax.Array:
  """torch AvgPool1d(4, 2, padding=2) (zero padding counted): [B, S] -> [B, S // 2 + 1]."""
  x = jnp.pad(wav, ((0, 0), (2, 2)))
  n = (x.shape[1] - 4) // 2 + 1
  idx = 2 * jnp.arange(n)[:, None] + jnp.arange(4)[None, :]  # [S', 4]
  return jnp.mean(x[:, idx], axis=-1)


class MultiPeriodDiscriminator(nnx.Module):
  """waveform [B, S] -> ([logits [B, N_p]] per period, [feature maps] per period)."""

  def __init__(self, periods: Sequence[int] = MPD_PERIODS,
               channels: Sequence[int] = MPD_CHANNELS, *, rngs: nnx.Rngs):
    self.discriminators = nnx.List([PeriodDiscriminator(p, channels, rngs=rngs)
                                    for p in periods])

  def __call__(self, wav: jax.Array) -> tuple[list[jax.Array], list[FeatureMaps]]:
    outs = [d(wav) for d in self.discriminators]
    return [o[0] for o in outs], [o[1] for o in outs]


class MultiScaleDiscriminator(nnx.Module):
  """waveform [B, S] -> ([logits] per scale, [feature maps] per scale); scale i sees the
  waveform average-pooled i times."""

  def __init__(self, num_scales: int = 3, channels: Sequence[int] = MSD_CHANNELS,
               groups: Sequence[int] = MSD_GROUPS, kernels: Sequence[int] = MSD_KERNELS,
               strides: Sequence[int] = MSD_STRIDES, *, rngs: nnx.Rngs):
    self.discriminators = nnx.List([ScaleDiscriminator(channels, groups, kernels, strides,
                                                       rngs=rngs)
                                    for _ in range(num_scales)])

  def __call__(self, wav: jax.Array) -> tuple[list[jax.Array], list[FeatureMaps]]:
    logits, fmaps = [], []
    for i, d in enumerate(self.discriminators):
      if i:
        wav = avg_pool_4_2(wav)  # [B, S / 2^i (+1)]
      lg, fm = d(wav)
      logits.append(lg)
      fmaps.append(fm)
    return logits, fmaps


class Discriminators(nnx.Module):
  """MPD + MSD: waveform [B, S] -> (all logits, all feature maps), MPD's first."""

  def __init__(self, mpd: MultiPeriodDiscriminator, msd: MultiScaleDiscriminator):
    self.mpd, self.msd = mpd, msd

  def __call__(self, wav: jax.Array) -> tuple[list[jax.Array], list[FeatureMaps]]:
    lp, fp = self.mpd(wav)
    ls, fs = self.msd(wav)
    return lp + ls, fp + fs


class HifiGan(nnx.Module):
  """The generator and both discriminators: the two parameter groups of the vocoder method
  (`generator`; `discriminator` = {mpd, msd})."""

  def __init__(self, generator: Generator, mpd: MultiPeriodDiscriminator,
               msd: MultiScaleDiscriminator):
    self.generator = generator
    self.discriminator = Discriminators(mpd, msd)
