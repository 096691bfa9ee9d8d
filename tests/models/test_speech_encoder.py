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
  ],
)
def test_batched_equals_one_at_a_time(kw):
  model = _model(**kw)
  rng = np.random.default_rng(0)
  lengths = [16000, 11234, 6001]
  wavs = [rng.normal(size=n).astype(np.float32) for n in lengths]
  batch = np.zeros((3, 16000), np.float32)
  mask = np.zeros((3, 16000), bool)
  for i, w in enumerate(wavs):
    batch[i, : len(w)], mask[i, : len(w)] = w, True
  run = jax.jit(lambda w, m: model(w, m))
  out = run(batch, mask)
  for i, w in enumerate(wavs):
    single = run(w[None], None)
    t = model.config.num_frames(len(w))
    assert int(out.frame_mask[i].sum()) == t == single.last_hidden_state.shape[1]
    for a, b in zip(out.hidden_states + (out.features,), single.hidden_states + (single.features,)):
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
