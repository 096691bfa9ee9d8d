"""The wav2vec-U 2.0 generator and discriminator vs torch modules written as fairseq's
`models/wav2vec_u.py` (w2vu2 config: generator kernel 9 / stride 3 / no bias / BatchNorm weight
30 / residual; causal discriminator of depth 2), with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models.w2vu import Discriminator, Generator

torch = pytest.importorskip('torch')


def _conv_to_torch(conv, tconv):
  with torch.no_grad():
    tconv.weight.copy_(torch.from_numpy(np.asarray(conv.kernel[...]).transpose(2, 1, 0)))
    if tconv.bias is not None:
      tconv.bias.copy_(torch.from_numpy(np.asarray(conv.bias[...])))


def _inputs(b=3, t=20, d=6):
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 2.0, size=(b, t, d)).astype(np.float32)
  mask = np.arange(t)[None] < np.array([t, 14, 7])[:b, None]
  return x, mask


def test_generator_matches_fairseq_forward_in_eval_and_train_statistics():
  x, mask = _inputs()
  d, v = x.shape[-1], 5
  gen = Generator(d, v, aux_dim=4, rngs=nnx.Rngs(0))
  mean = np.linspace(-1, 1, d).astype(np.float32)
  var = np.linspace(0.5, 2, d).astype(np.float32)
  # torch, fairseq-style
  bn = torch.nn.BatchNorm1d(d)
  in_proj = torch.nn.Linear(d, d)
  proj = torch.nn.Conv1d(d, v, kernel_size=9, stride=3, padding=4, bias=False)
  with torch.no_grad():
    bn.weight.fill_(30.0)
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
    in_proj.weight.copy_(torch.from_numpy(np.asarray(gen.in_proj.kernel[...]).T))
    in_proj.bias.copy_(torch.from_numpy(np.asarray(gen.in_proj.bias[...])))
  _conv_to_torch(gen.proj, proj)
  for train in (False, True):
    bn.train(train)
    with torch.no_grad():
      tx = torch.from_numpy(x)
      normed = tx.clone()
      normed[torch.from_numpy(mask)] = bn(tx[torch.from_numpy(mask)])  # bn_padded_data
      h = normed + in_proj(normed)  # dropout off
      want = proj(h.transpose(1, 2)).transpose(1, 2).numpy()
    # No rng = no dropout; `train` selects batch vs running statistics.
    out = gen(jnp.asarray(x), jnp.asarray(mask), (mean, var), train=train)
    np.testing.assert_allclose(np.asarray(out['logits']), want, rtol=2e-4, atol=2e-3)
    np.testing.assert_array_equal(np.asarray(out['mask']), mask[:, ::3])
    assert out['logits'].shape == (3, 7, v) and out['aux_logits'].shape == (3, 20, 4)
    if train:
      np.testing.assert_allclose(np.asarray(out['bn_stats'][1]), bn.running_var.numpy(),
                                 rtol=1e-5)


def test_discriminator_matches_fairseq_causal_convs_and_masked_mean():
  x, mask = _inputs(d=5)
  v, h, k = 5, 8, 4
  disc = Discriminator(v, inner_dim=h, kernel=k, depth=3, causal=True, rngs=nnx.Rngs(1))
  convs = [torch.nn.Conv1d(v, h, k, padding=k - 1)] + \
    [torch.nn.Conv1d(h, h, k, padding=k - 1) for _ in range(2)] + [torch.nn.Conv1d(h, 1, k,
                                                                                  padding=k - 1)]
  for c, tc in zip([disc.emb, *disc.inner, disc.out], convs):
    _conv_to_torch(c, tc)
  with torch.no_grad():
    z = torch.from_numpy(x).transpose(1, 2)
    z = convs[0](z)[..., :-(k - 1)]  # SamePad(causal) drops the last k-1 outputs
    for c in convs[1:3]:
      z = torch.nn.functional.gelu(c(z)[..., :-(k - 1)])
    y = convs[3](z)[..., :-(k - 1)][:, 0]  # [B, T]
    y[~torch.from_numpy(mask)] = 0
    want = (y.sum(-1) / torch.from_numpy(mask).sum(-1)).numpy()
  got = disc(jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # Causal: a change at the last frame moves no earlier output, so the score of a sequence
  # masked before that frame is unchanged.
  x2 = x.copy()
  x2[:, -1] += 5.0
  np.testing.assert_allclose(np.asarray(disc(jnp.asarray(x2), jnp.asarray(mask))[1:]),
                             np.asarray(got[1:]), rtol=1e-6)


def test_torch_default_initialisation_bounds():
  gen = Generator(300, 40, rngs=nnx.Rngs(0))
  w = np.asarray(gen.proj.kernel[...])
  bound = 1 / np.sqrt(300 * 9)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  assert np.all(np.asarray(gen.bn_scale[...]) == 30.0)
  jax.block_until_ready(w)
