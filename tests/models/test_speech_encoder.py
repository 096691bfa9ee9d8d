"""Speech encoder properties that need no reference implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.layers.attention import relative_position_buckets
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder, frozen_mask


def _model(**kw):
  return SpeechEncoder(EncoderConfig.preset("tiny", **kw), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "kw",
  [
    dict(model_type="hubert"),
    dict(model_type="wavlm"),
    dict(do_stable_layer_norm=True, feat_extract_norm="layer"),
    # data2vec's positional conv stack: padded frames re-zeroed before every conv. In float64:
    # in float32 its five LayerNorm'd convs alone put batch 3 and batch 1 (XLA picks other conv
    # algorithms) 1.4e-5 apart, on the unpadded row as much as on the padded ones.
    dict(pos_conv_depth=5, num_conv_pos_embeddings=19, num_conv_pos_embedding_groups=16,
         dtype="float64", param_dtype="float64"),
  ],
)
def test_batched_equals_one_at_a_time(kw):
  with jax.enable_x64(kw.get("dtype") == "float64"):
    model = _model(**kw)
    dtype = np.dtype(model.config.dtype)
    rng = np.random.default_rng(0)
    lengths = [16000, 11234, 6001]
    wavs = [rng.normal(size=n).astype(dtype) for n in lengths]
    batch = np.zeros((3, 16000), dtype)
    mask = np.zeros((3, 16000), bool)
    for i, w in enumerate(wavs):
      batch[i, : len(w)], mask[i, : len(w)] = w, True
    run = jax.jit(lambda w, m: model(w, m))
    out = run(batch, mask)
    for i, w in enumerate(wavs):
      single = run(w[None], None)
      t = model.config.num_frames(len(w))
      assert int(out.frame_mask[i].sum()) == t == single.last_hidden_state.shape[1]
      for a, b in zip(out.hidden_states + (out.features,),
                      single.hidden_states + (single.features,)):
        np.testing.assert_allclose(np.asarray(a[i, :t]), np.asarray(b[0]), atol=1e-5, rtol=0)


def test_padding_content_does_not_matter():
  model = _model()
  rng = np.random.default_rng(1)
  wav = rng.normal(size=(1, 16000)).astype(np.float32)
  mask = np.arange(16000)[None] < 9000
  a = model(jnp.asarray(wav), jnp.asarray(mask))
  wav2 = wav.copy()
  wav2[:, 9000:] = 100.0 * rng.normal(size=7000)
  b = model(jnp.asarray(wav2), jnp.asarray(mask))
  t = int(a.frame_mask.sum())
  np.testing.assert_allclose(a.last_hidden_state[:, :t], b.last_hidden_state[:, :t], atol=1e-5)


def test_mask_embedding_dropout_and_truncation():
  model = SpeechEncoder(
    EncoderConfig.preset("tiny", hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1),
    rngs=nnx.Rngs(0),
  )
  wav = jax.random.normal(jax.random.key(0), (2, 8000))
  base = model(wav)
  t = base.frame_mask.shape[1]
  # Masked frames are replaced by the learned embedding before the transformer.
  mti = jnp.zeros((2, t), bool).at[:, 3:8].set(True)
  masked = model(wav, mask_time_indices=mti)
  assert not np.allclose(masked.last_hidden_state, base.last_hidden_state)
  x, _, _ = model.embed(wav)
  # Dropout only when asked, reproducible per key.
  d1 = model(wav, deterministic=False, rngs=jax.random.key(1)).last_hidden_state
  d2 = model(wav, deterministic=False, rngs=jax.random.key(1)).last_hidden_state
  d3 = model(wav, deterministic=False, rngs=jax.random.key(2)).last_hidden_state
  np.testing.assert_array_equal(d1, d2)
  assert not np.allclose(d1, d3) and not np.allclose(d1, base.last_hidden_state)
  with pytest.raises(ValueError, match="rng"):
    model(wav, deterministic=False)
  # Running two blocks gives the first three hidden states of the full run.
  part = model(wav, num_layers=2)
  assert len(part.hidden_states) == 3
  for a, b in zip(part.hidden_states, base.hidden_states[:3]):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_frozen_mask_selects_by_path():
  model = _model()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  m = frozen_mask(params, r"^encoder/layers/(2|3)/")
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in p): v
    for p, v in jax.tree_util.tree_leaves_with_path(m)
  }
  trainable = [k for k, v in flat.items() if v]
  assert trainable and all(
    k.startswith(("encoder/layers/2/", "encoder/layers/3/")) for k in trainable
  )
  assert len(trainable) == 2 * len([k for k in flat if k.startswith("encoder/layers/0/")])


def test_relative_position_buckets_properties():
  b = relative_position_buckets(1000, 320, 800)
  assert b.shape == (1000, 1000) and b.min() >= 0 and b.max() <= 319
  assert (np.diag(b) == 0).all()
  # Exact buckets for small offsets, one side per sign, monotone in distance.
  assert b[0, 5] == 160 + 5 and b[5, 0] == 5
  row = b[0, 1:]
  assert (np.diff(row) >= 0).all() and row[-1] == 319


def test_num_frames_matches_output():
  model = _model()
  for s in (400, 401, 16000, 16319, 16320):
    out = jax.eval_shape(model, jax.ShapeDtypeStruct((1, s), jnp.float32))
    assert out.last_hidden_state.shape[1] == model.config.num_frames(s)
  with pytest.raises(ValueError, match="unknown encoder preset"):
    EncoderConfig.preset("nope")
  with pytest.raises(ValueError, match="model_type"):
    EncoderConfig(model_type="bert")


def test_cpu_grouped_conv_gradient_equals_autodiff():
  from jaxspeech.layers.transformer import _grouped_conv, grouped_conv_cpu

  x = jax.random.normal(jax.random.key(0), (2, 37, 32))
  w = jax.random.normal(jax.random.key(1), (16, 8, 32)) * 0.1
  dy = jax.random.normal(jax.random.key(2), (2, 38, 32))
  for f in (_grouped_conv, grouped_conv_cpu):
    assert f(x, w, 4, 8).shape == (2, 38, 32)
  np.testing.assert_allclose(grouped_conv_cpu(x, w, 4, 8), _grouped_conv(x, w, 4, 8), atol=1e-6)
  loss = lambda f: lambda a, b: jnp.sum(f(a, b, 4, 8) * dy)
  want = jax.grad(loss(_grouped_conv), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(loss(grouped_conv_cpu), argnums=(0, 1)))(x, w)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_ffn_outputs_rebuild_each_block(pre_norm):
  """`return_ffn`: the same hidden states, plus each block's feed-forward output before the
  residual add, checked by rebuilding every block from its sub-modules."""
  kw = dict(do_stable_layer_norm=True, feat_extract_norm="layer") if pre_norm else {}
  model = _model(**kw)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 30, model.config.hidden_size)), jnp.float32)  # [B, T, D]
  mask = jnp.arange(30)[None] < jnp.array([[30], [21]])  # [B, T]
  enc = model.encoder
  hidden, last = enc(x, mask)
  hidden2, last2, ffn = enc(x, mask, return_ffn=True)
  assert len(ffn) == len(hidden) - 1 == model.config.num_hidden_layers
  for a, b in zip(hidden + (last,), hidden2 + (last2,)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for i, block in enumerate(enc.layers):
    h = hidden[i]
    if pre_norm:
      mid = h + block.attention(block.layer_norm(h), mask)
      f = block.feed_forward(block.final_layer_norm(mid))
      out = mid + f
    else:
      mid = block.layer_norm(h + block.attention(h, mask))
      f = block.feed_forward(mid)
      out = block.final_layer_norm(mid + f)
    np.testing.assert_allclose(np.asarray(ffn[i]), np.asarray(f), atol=1e-5)
    np.testing.assert_allclose(np.asarray(hidden[i + 1]), np.asarray(out), atol=1e-5)


def test_deep_pos_conv_is_the_data2vec_stack():
  """`pos_conv_depth > 1`: depth x [grouped conv, LayerNorm without affine, GELU], no weight
  norm, checked against a numpy rebuild (even kernel: the last frame of 'same' padding dropped);
  the default stays wav2vec 2.0's single weight-normed conv."""
  from jaxspeech.layers.transformer import ConvPositionalEmbedding, DeepConvPositionalEmbedding

  assert isinstance(_model().encoder.pos_conv_embed, ConvPositionalEmbedding)
  d, g, depth = 16, 4, 3
  for k in (5, 6):
    enc = _model(hidden_size=d, num_attention_heads=2, num_conv_pos_embeddings=k,
                 num_conv_pos_embedding_groups=g, pos_conv_depth=depth).encoder
    pos = enc.pos_conv_embed
    assert isinstance(pos, DeepConvPositionalEmbedding) and len(pos.layers) == depth
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(pos, nnx.Param))}
    assert names == {f"layers/{i}/{n}" for i in range(depth) for n in ("kernel", "bias")}
    x = np.random.default_rng(k).normal(size=(2, 11, d)).astype(np.float32)  # [B, T, D]
    got = np.asarray(pos(jnp.asarray(x)))
    h = x.astype(np.float64)
    for layer in pos.layers:
      w, b = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
      hp = np.pad(h, ((0, 0), (k // 2, k // 2), (0, 0)))
      y = np.zeros_like(h)
      for gi in range(g):  # [K, D/G, D]: group gi maps inputs gi*D/G.. to outputs gi*D/G..
        c = slice(gi * d // g, (gi + 1) * d // g)
        for t in range(h.shape[1]):
          y[:, t, c] = np.einsum("bki,kio->bo", hp[:, t:t + k, c], w[:, :, c])
      y = y + b
      y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)
      h = np.asarray(jax.nn.gelu(y, approximate=False))
    np.testing.assert_allclose(got, h, atol=1e-5, rtol=0)


def test_new_fields_validate_and_pass_through_config_model():
  from jaxspeech.models.encoders import encoder_config, model_config

  with pytest.raises(ValueError, match=r"EncoderConfig\.pos_conv_depth"):
    EncoderConfig(pos_conv_depth=0)
  with pytest.raises(ValueError, match=r"EncoderConfig\.layerdrop"):
    EncoderConfig(layerdrop=1.5)
  c = model_config("tiny", pos_conv_depth=5, num_conv_pos_embeddings=19,
                   num_conv_pos_embedding_groups=16, layerdrop=0.05)
  cfg = encoder_config(c)
  assert (cfg.pos_conv_depth, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups,
          cfg.layerdrop) == (5, 19, 16, 0.05)
  assert cfg.has_dropout and not EncoderConfig.preset("tiny").has_dropout
  assert encoder_config(model_config("tiny")).pos_conv_depth == 1
  d2v = EncoderConfig.preset("data2vec-audio-base")
  assert (d2v.pos_conv_depth, d2v.num_conv_pos_embeddings, d2v.feat_extract_norm) == (
    5, 19, "layer")


def _encoder_input(model, t=20, b=2):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, t, model.config.hidden_size)), jnp.float32)  # [B, T, D]
  mask = jnp.arange(t)[None] < jnp.array([[t], [t - 6]])[:b]  # [B, T]
  return x, mask


@pytest.mark.parametrize("pre_norm, scan_layers", [(False, False), (True, False), (False, True)])
def test_layerdrop_one_skips_every_block(pre_norm, scan_layers):
  """layerdrop=1 in training: every block passes its input through, so every hidden state is the
  positional-conv output hidden_states[0], and the output is that (post-LN) or its final
  LayerNorm (pre-LN); layerdrop=0 in training and any layerdrop in eval are the eval model."""
  kw = dict(do_stable_layer_norm=True, feat_extract_norm="layer") if pre_norm else {}
  model = _model(scan_layers=scan_layers, remat="full" if scan_layers else "none", **kw)
  x, mask = _encoder_input(model)
  ref_hidden, ref_last = model.encoder(x, mask)  # deterministic
  key = jax.random.key(7)
  model.encoder.cfg = EncoderConfig.preset("tiny", layerdrop=1.0, scan_layers=scan_layers, **kw)
  hidden, last = model.encoder(x, mask, deterministic=False, rng=key)
  for h in hidden:
    np.testing.assert_array_equal(np.asarray(h), np.asarray(ref_hidden[0]))
  want = model.encoder.layer_norm(ref_hidden[0]) if pre_norm else ref_hidden[0]
  np.testing.assert_array_equal(np.asarray(last), np.asarray(want))
  # Eval ignores layerdrop (and needs no key).
  hidden, last = model.encoder(x, mask, deterministic=True)
  for a, b in zip(hidden + (last,), ref_hidden + (ref_last,)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model.encoder.cfg = EncoderConfig.preset("tiny", layerdrop=0.0, scan_layers=scan_layers, **kw)
  hidden, last = model.encoder(x, mask, deterministic=False, rng=key)
  for a, b in zip(hidden + (last,), ref_hidden + (ref_last,)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layerdrop_rate_is_binomial_and_whole_batch():
  """layerdrop=0.5 over 250 keys x 4 blocks: a block is skipped iff its hidden state equals its
  input, for both utterances of the batch at once; the count of skips, in all and per block, lies
  within the two-sided 1e-6 quantiles of Binomial(n, 0.5), and the loop and scan layouts skip the
  same blocks for the same key."""
  from scipy.stats import binom

  p, n_keys = 0.5, 250
  loop = _model(layerdrop=p)
  scan = _model(layerdrop=p, scan_layers=True)
  x, mask = _encoder_input(loop)
  num_layers = loop.config.num_hidden_layers

  def skipped(model):
    @jax.jit
    def run(key):
      hidden, _ = model.encoder(x, mask, deterministic=False, rng=key)
      h = jnp.stack(hidden)  # [L+1, B, T, D]
      return jnp.all(h[1:] == h[:-1], axis=(2, 3))  # [L, B]: block i passed its input through

    return np.stack([np.asarray(run(k)) for k in jax.random.split(jax.random.key(0), n_keys)])

  s_loop = skipped(loop)  # [keys, L, B]
  assert (s_loop[..., 0] == s_loop[..., 1]).all()  # the whole batch skips a block or none does
  np.testing.assert_array_equal(skipped(scan), s_loop)

  def bounds(n):
    return binom.ppf(0.5e-6, n, p), binom.isf(0.5e-6, n, p)

  lo, hi = bounds(n_keys * num_layers)
  assert lo <= s_loop[..., 0].sum() <= hi, (s_loop[..., 0].sum(), lo, hi)
  lo, hi = bounds(n_keys)
  for i, c in enumerate(s_loop[..., 0].sum(0)):
    assert lo <= c <= hi, (i, c, lo, hi)


def test_layerdrop_skipped_block_gets_no_gradient():
  """A skipped block takes no part in the step: its parameters' gradients are exactly zero, the
  others' are not (scan + remat layout: the skip is a `lax.cond` inside the scanned body)."""
  model = _model(layerdrop=0.5, scan_layers=True, remat="full")
  x, mask = _encoder_input(model)
  graphdef, params, rest = nnx.split(model.encoder, nnx.Param, ...)
  for k in range(8):
    key = jax.random.key(k)
    drop = np.asarray(model.encoder.layer_drops(key, model.config.num_hidden_layers, False))
    if drop.any() and not drop.all():
      break

  def loss(params):
    enc = nnx.merge(graphdef, params, rest)
    _, last = enc(x, mask, deterministic=False, rng=key)
    return jnp.sum(last ** 2)

  grads = jax.grad(loss)(params)
  w = np.asarray(grads["layers"]["feed_forward"]["output_dense"]["kernel"][...])  # [L, F, D]
  for i, d in enumerate(drop):
    assert (np.abs(w[i]).max() == 0.0) == bool(d), (i, d)
