"""HiFi-GAN modules: output lengths (T mel frames -> exactly T * hop samples), discriminator
logits and feature maps, and parity with a torch implementation of the reference layers
(jik876/hifi-gan `models.py`, without weight norm) on the same weights."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models import vocoder as voc

TINY_GEN = dict(channels=16, upsample_rates=(8, 8, 4), resblock_kernels=(3, 5),
                resblock_dilations=((1, 3, 5), (1, 3, 5)))


@pytest.mark.parametrize('rates', [(8, 8, 4), (8, 8, 2, 2), (4, 4, 4, 4), (3, 5)])
def test_upsample_padding_multiplies_the_length_exactly(rates):
  x = jnp.ones((1, 5, 4))
  for u in rates:
    up = nnx.ConvTranspose(4, 4, (2 * u,), strides=(u,), padding=[voc.upsample_padding(2 * u, u)],
                           rngs=nnx.Rngs(0))
    assert up(x).shape == (1, 5 * u, 4), u


def test_generator_output_is_frames_times_hop_and_jits():
  gen = voc.Generator(80, **TINY_GEN, rngs=nnx.Rngs(0))
  assert gen.hop == 256
  graph, state = nnx.split(gen)

  @jax.jit
  @chex.assert_max_traces(n=2)  # one trace per input shape below, none more
  def vocode(state, mel):
    return nnx.merge(graph, state)(mel)

  for b, t in [(2, 1), (3, 33)]:
    mel = jax.random.normal(jax.random.key(t), (b, t, 80)) - 5.0
    wav = vocode(state, mel)
    assert wav.shape == (b, t * 256) and wav.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(wav))) < 1.0  # tanh output
  vocode(state, jnp.zeros((2, 1, 80)))  # same shape: no retrace
  # HiFi-GAN V1 (512 channels, rates 8, 8, 2, 2) by shapes only.
  v1 = jax.eval_shape(lambda: voc.Generator(80, rngs=nnx.Rngs(0))(jnp.zeros((1, 10, 80))))
  assert v1.shape == (1, 2560)


def test_discriminators_logits_and_feature_maps():
  mpd = voc.MultiPeriodDiscriminator(channels=(4, 8, 8, 8, 8), rngs=nnx.Rngs(0))
  msd = voc.MultiScaleDiscriminator(channels=(4, 8, 8, 8, 8, 8, 8), groups=(1, 2, 4, 4, 4, 4, 1),
                                    rngs=nnx.Rngs(1))
  disc = voc.Discriminators(mpd, msd)
  wav = jax.random.normal(jax.random.key(0), (3, 2000))
  logits, fmaps = jax.jit(lambda w: disc(w))(wav)
  assert len(logits) == len(fmaps) == 5 + 3
  for p, lg, fm in zip(voc.MPD_PERIODS, logits[:5], fmaps[:5]):
    assert len(fm) == 6  # 5 convs + the logits map
    t = -(-2000 // p)  # reflect-padded to whole periods
    for i in range(4):  # four stride-3 convs (kernel 5, padding 2)
      t = (t - 1) // 3 + 1
      assert fm[i].shape[:3] == (3, t, p)
    assert fm[-1].shape == (3, t, p, 1) and lg.shape == (3, t * p)
  lengths = [2000, 1001, 501]  # avg-pool 4/2 with padding 2: S -> S // 2 + 1
  for s, lg, fm in zip(lengths, logits[5:], fmaps[5:]):
    assert len(fm) == 8 and fm[0].shape == (3, s, 4)
    t = s
    for st in voc.MSD_STRIDES:
      t = (t - 1) // st + 1
    assert lg.shape == (3, t)


# --- parity with torch implementations of the reference layers ----------------------------------

def _t(x):
  torch = pytest.importorskip('torch')
  return torch.from_numpy(np.asarray(x, np.float32).copy())


def _w1d(conv):  # flax [k, in / g, out] -> torch [out, in / g, k]
  return _t(np.transpose(np.asarray(conv.kernel[...]), (2, 1, 0)))


def _w2d(conv):  # flax [kh, kw, in, out] -> torch [out, in, kh, kw]
  return _t(np.transpose(np.asarray(conv.kernel[...]), (3, 2, 0, 1)))


def _torch_generator(gen: voc.Generator, mel: np.ndarray) -> np.ndarray:
  """HiFi-GAN's Generator.forward, written with torch.nn.functional on `gen`'s weights."""
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  x = _t(mel).transpose(1, 2)  # [B, M, T]
  x = F.conv1d(x, _w1d(gen.conv_pre), _t(gen.conv_pre.bias[...]), padding=3)
  for up, mrf in zip(gen.ups, gen.mrfs):
    k = up.kernel.shape[0]
    u = up.strides[0] if isinstance(up.strides, tuple) else up.strides
    # flax [k, in, out] (no flip) -> torch ConvTranspose1d [in, out, k] (flipped taps).
    w = _t(np.transpose(np.asarray(up.kernel[...]), (1, 2, 0))[:, :, ::-1])
    x = F.conv_transpose1d(F.leaky_relu(x, 0.1), w, _t(up.bias[...]), stride=u,
                           padding=(k - u) // 2)
    xs = 0
    for block in mrf:
      h = x
      for c1, c2 in zip(block.convs1, block.convs2):
        k1, d = c1.kernel.shape[0], c1.kernel_dilation
        d = d[0] if isinstance(d, tuple) else d
        xt = F.conv1d(F.leaky_relu(h, 0.1), _w1d(c1), _t(c1.bias[...]), dilation=d,
                      padding=(k1 * d - d) // 2)
        xt = F.conv1d(F.leaky_relu(xt, 0.1), _w1d(c2), _t(c2.bias[...]), padding=k1 // 2)
        h = xt + h
      xs = xs + h
    x = xs / len(mrf)
  x = F.conv1d(F.leaky_relu(x), _w1d(gen.conv_post), _t(gen.conv_post.bias[...]), padding=3)
  return torch.tanh(x)[:, 0].numpy()


def test_generator_matches_a_torch_implementation_of_the_reference():
  gen = voc.Generator(80, **TINY_GEN, rngs=nnx.Rngs(0))
  # Weights x20 (the N(0, 0.01) init gives a ~1e-4 output): every layer shapes the output and
  # tanh is not saturated (output std ~0.07).
  graph, state = nnx.split(gen)
  state = jax.tree.map(lambda x: x * 20.0, state)
  gen = nnx.merge(graph, state)
  mel = np.asarray(jax.random.normal(jax.random.key(1), (2, 6, 80)))
  ours = np.asarray(gen(jnp.asarray(mel)))
  ref = _torch_generator(gen, mel)
  assert np.std(ref) > 0.02 and np.mean(np.abs(ref) > 0.99) < 0.01  # not a degenerate case
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_discriminators_match_torch_implementations_of_the_reference():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  wav = np.asarray(jax.random.normal(jax.random.key(2), (2, 1000)))
  # Period discriminator (period 3: 1000 samples are reflect-padded to 1002).
  pd = voc.PeriodDiscriminator(3, (4, 8, 8, 8, 8), rngs=nnx.Rngs(0))
  logits, fmaps = pd(jnp.asarray(wav))
  x = F.pad(_t(wav)[:, None], (0, 2), 'reflect').view(2, 1, -1, 3)
  for i, conv in enumerate(pd.convs):
    x = F.leaky_relu(F.conv2d(x, _w2d(conv), _t(conv.bias[...]), stride=(3 if i < 4 else 1, 1),
                              padding=(2, 0)), 0.1)
    np.testing.assert_allclose(np.asarray(fmaps[i]), x.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  x = F.conv2d(x, _w2d(pd.conv_post), _t(pd.conv_post.bias[...]), padding=(1, 0))
  np.testing.assert_allclose(np.asarray(logits), torch.flatten(x, 1).numpy(), atol=1e-5)
  # Scale discriminator with grouped convs, on the twice-pooled waveform.
  sd = voc.ScaleDiscriminator((4, 8, 8, 16, 16, 16, 16), (1, 2, 4, 4, 4, 4, 1),
                              rngs=nnx.Rngs(1))
  pooled = voc.avg_pool_4_2(voc.avg_pool_4_2(jnp.asarray(wav)))
  pool = torch.nn.AvgPool1d(4, 2, padding=2)
  x = pool(pool(_t(wav)[:, None]))
  np.testing.assert_allclose(np.asarray(pooled), x[:, 0].numpy(), atol=1e-6)
  logits, _ = sd(pooled)
  for conv, k, s, g in zip(sd.convs, voc.MSD_KERNELS, voc.MSD_STRIDES, (1, 2, 4, 4, 4, 4, 1)):
    x = F.leaky_relu(F.conv1d(x, _w1d(conv), _t(conv.bias[...]), stride=s, padding=k // 2,
                              groups=g), 0.1)
  x = F.conv1d(x, _w1d(sd.conv_post), _t(sd.conv_post.bias[...]), padding=1)
  np.testing.assert_allclose(np.asarray(logits), torch.flatten(x, 1).numpy(), atol=1e-5)
