"""Scale knobs of the speech encoder: scanned layers, remat policies, bfloat16 compute and the
parameter storage dtype. The loop / scan / remat variants must compute the same function (forward
and gradients, float32, 1e-5); bfloat16 compute must stay within bfloat16's rounding of float32."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.models.speech_encoder import (
  REMAT_POLICIES,
  EncoderConfig,
  SpeechEncoder,
  is_stacked,
  stack_layers,
  to_layer_layout,
  unstack_layers,
)

TOL = 1e-5  # float32: a scan or a recomputation reorders no reduction, only fuses differently


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _batch():
  """Two utterances, the second padded: [B, S] waveform and mask."""
  wav = jax.random.normal(jax.random.key(0), (2, 8000))
  mask = jnp.arange(8000)[None] < jnp.array([[8000], [5600]])
  return wav, mask


def _loss_and_grads(cfg: EncoderConfig, params, dropout_key=None):
  """Mean square of a random projection of last_hidden_state over valid frames, the hidden
  states and the loss's gradient, for `params` in the loop layout (converted to the layout of
  `cfg`); gradients come back in the loop layout."""
  model = nnx.eval_shape(lambda: SpeechEncoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, to_layer_layout(params, cfg.scan_layers))
  wav, mask = _batch()

  # A fixed random projection: the mean square of a post-LN output itself is ~1 by construction.
  proj = jax.random.normal(jax.random.key(1), (cfg.hidden_size, 16)) / np.sqrt(cfg.hidden_size)

  def loss_fn(st):
    out = nnx.merge(graphdef, st)(wav, mask, deterministic=dropout_key is None, rngs=dropout_key)
    y = out.last_hidden_state.astype(jnp.float32) @ proj  # [B, T, 16]
    fm = out.frame_mask[..., None]  # [B, T, 1]
    loss = jnp.sum(jnp.where(fm, y * y, 0.0)) / (jnp.sum(fm) * y.shape[-1])
    return loss, out.hidden_states

  (loss, hidden), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
  return loss, hidden, to_layer_layout(nnx.to_pure_dict(grads), False)


def _assert_trees_close(a, b, tol, what):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=tol, atol=tol,
      err_msg=f"{what} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def hubert_loop():
  """The reference: tiny HuBERT, float32 layer loop. (params, loss, hidden_states, grads)."""
  cfg = EncoderConfig.preset("tiny")
  params = _params(SpeechEncoder(cfg, rngs=nnx.Rngs(0)))
  return (cfg, params, *_loss_and_grads(cfg, params))


def _assert_same_function(cfg, params, ref, key=None):
  loss, hidden, grads = _loss_and_grads(cfg, params, key)
  ref_loss, ref_hidden, ref_grads = ref
  what = f"scan_layers={cfg.scan_layers} remat={cfg.remat}"
  np.testing.assert_allclose(loss, ref_loss, rtol=TOL, err_msg=what)
  assert len(hidden) == len(ref_hidden) == cfg.num_hidden_layers + 1
  _assert_trees_close(hidden, ref_hidden, TOL, f"{what} hidden_states")
  _assert_trees_close(grads, ref_grads, TOL, f"{what} grad")


@pytest.mark.parametrize(
  "scan_layers, remat", [(True, "none"), (True, "full"), (False, "dots_saveable")]
)
def test_loop_scan_and_remat_compute_the_same_loss_and_gradients(hubert_loop, scan_layers, remat):
  cfg, params, *ref = hubert_loop
  _assert_same_function(dataclasses.replace(cfg, scan_layers=scan_layers, remat=remat), params, ref)


def test_scanned_wavlm_with_dropout_is_the_loop_wavlm():
  """WavLM's bucket embedding sits outside the scanned block; with dropout on, the same keys
  reach the same layers in both layouts, also when remat recomputes a block."""
  cfg = EncoderConfig.preset("tiny", model_type="wavlm", hidden_dropout=0.1,
                             attention_dropout=0.1, activation_dropout=0.1)
  params = _params(SpeechEncoder(cfg, rngs=nnx.Rngs(0)))
  key = jax.random.key(3)
  ref = _loss_and_grads(cfg, params, key)
  _assert_same_function(dataclasses.replace(cfg, scan_layers=True, remat="full"), params, ref, key)


def test_scan_layout_same_init_early_exit_and_ffn_outputs():
  loop_cfg = EncoderConfig.preset("tiny", do_stable_layer_norm=True, feat_extract_norm="layer")
  loop = SpeechEncoder(loop_cfg, rngs=nnx.Rngs(0))
  scan = SpeechEncoder(dataclasses.replace(loop_cfg, scan_layers=True), rngs=nnx.Rngs(0))
  p_loop, p_scan = _params(loop), _params(scan)
  # One seed, one model: the stacked parameters are the loop's, stacked.
  assert not is_stacked(p_loop) and is_stacked(p_scan)
  assert p_scan["encoder"]["layers"]["attention"]["q_proj"]["kernel"].shape == (4, 128, 128)
  jax.tree.map(np.testing.assert_array_equal, stack_layers(p_loop), p_scan)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(p_scan), p_loop)
  wav, mask = _batch()
  full = loop(wav, mask)
  # num_layers=k runs the first k stacked blocks only (pre-LN: no final LayerNorm then).
  part = scan(wav, mask, num_layers=2)
  assert len(part.hidden_states) == 3
  _assert_trees_close(part.hidden_states, full.hidden_states[:3], TOL, "early exit")
  np.testing.assert_allclose(part.last_hidden_state, full.hidden_states[2], rtol=TOL, atol=TOL)
  x, _, frame_mask = loop.embed(wav, mask)
  h_loop, last_loop, f_loop = loop.encoder(x, frame_mask, return_ffn=True)
  h_scan, last_scan, f_scan = scan.encoder(x, frame_mask, return_ffn=True)
  _assert_trees_close((h_scan, last_scan, f_scan), (h_loop, last_loop, f_loop), TOL, "return_ffn")


def test_stacked_weights_get_a_replicated_leading_layers_axis():
  from jax.sharding import AbstractMesh, PartitionSpec

  from jaxspeech.train import partitioning as part

  model = nnx.eval_shape(
    lambda: SpeechEncoder(EncoderConfig.preset("tiny", scan_layers=True), rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  axes = part.param_logical_axes(state)
  layers = axes["encoder"]["layers"]
  assert layers["attention"]["q_proj"]["kernel"] == ("layers", "embed", "heads")
  assert layers["feed_forward"]["output_dense"]["kernel"] == ("layers", "mlp", "embed")
  assert layers["final_layer_norm"]["scale"] == ("layers", "norm")
  # 'layers' names no mesh axis in any rule: the layer axis stays whole on every device.
  mesh = AbstractMesh((1, 2, 2), part.MESH_AXES)
  rules = part.parse_rules([("embed", "fsdp"), ("mlp", "model"), ("heads", "model")])
  spec = part.logical_to_mesh_spec(("layers", "embed", "heads"), (4, 128, 128), mesh, rules)
  assert spec == PartitionSpec(None, "fsdp", "model")


def test_bfloat16_compute_stays_within_bfloat16_rounding_of_float32(hubert_loop):
  """bfloat16 keeps 8 significant bits: unit roundoff u = 2^-8 = 3.9e-3. Bounds, in units of u
  (what bfloat16 can promise, not fits to a run): the loss within 2 u of float32's (a mean over
  ~800 projected squares averages the per-op roundings; measured 0.11 u = 4.5e-4), the whole
  gradient vector within 4 u in relative L2 norm (the backward pass rounds about twice as many
  ops again; measured 2.4 u = 9.2e-3). Parameters and their gradients stay float32."""
  base, params, ref_loss, _, ref_grads = hubert_loop
  cfg = dataclasses.replace(base, dtype="bfloat16", scan_layers=True, remat="full")
  loss, hidden, grads = _loss_and_grads(cfg, params)
  u = 2.0**-8
  assert hidden[-1].dtype == jnp.bfloat16
  rel = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
  assert rel <= 2 * u, f"bfloat16 loss {loss} vs float32 {ref_loss}: rel err {rel / u:.2f} u"
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])  # noqa: E731
  g, g_ref = flat(grads), flat(ref_grads)
  rel_g = np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)
  assert rel_g <= 4 * u, f"bfloat16 gradient: relative L2 error {rel_g / u:.2f} u"


@pytest.mark.parametrize("scan_layers", [False, True])
def test_param_dtype_is_the_storage_dtype(scan_layers):
  cfg = EncoderConfig.preset("tiny", param_dtype="bfloat16", scan_layers=scan_layers)
  model = SpeechEncoder(cfg, rngs=nnx.Rngs(0))
  dtypes = {p.dtype for p in jax.tree.leaves(_params(model))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  wav, mask = _batch()
  out = jax.jit(lambda w, m: model(w, m))(wav, mask)  # compute dtype stays float32
  assert out.last_hidden_state.dtype == jnp.float32
  assert np.isfinite(np.asarray(out.last_hidden_state)).all()
  # The defaults store float32.
  default = jax.tree.leaves(_params(SpeechEncoder(EncoderConfig.preset("tiny"), rngs=nnx.Rngs(0))))
  assert {p.dtype for p in default} == {jnp.dtype(jnp.float32)}


def test_bad_scale_fields_raise_naming_the_field():
  with pytest.raises(ValueError, match=r"EncoderConfig\.remat must be one of .*'everything'"):
    EncoderConfig(remat="everything")
  with pytest.raises(ValueError, match=r"EncoderConfig\.param_dtype .*'int8'"):
    EncoderConfig(param_dtype="int8")
  with pytest.raises(ValueError, match=r"EncoderConfig\.dtype .*'bfloat17'"):
    EncoderConfig(dtype="bfloat17")
  with pytest.raises(ValueError, match=r"EncoderConfig\.scan_layers must be a bool"):
    EncoderConfig(scan_layers="yes")
  assert set(REMAT_POLICIES) >= {"none", "full", "dots_saveable", "nothing_saveable"}


def test_scale_fields_are_config_keys():
  from jaxspeech.methods.base import encoder_config, model_config

  c = model_config("tiny", scan_layers=True, remat="dots_saveable", dtype="bfloat16")
  cfg = encoder_config(c)
  assert (cfg.scan_layers, cfg.remat, cfg.dtype, cfg.param_dtype) == (
    True, "dots_saveable", "bfloat16", "float32")
  c = model_config("tiny")
  c.remat = "bogus"
  with pytest.raises(ValueError, match="remat"):
    encoder_config(c)


SHARDED = """
import numpy as np, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxspeech.layers import partitioning as layer_part
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder
from jaxspeech.train import partitioning as part
cfg = EncoderConfig.preset("tiny", scan_layers=True, remat="full")
graphdef, params = nnx.split(SpeechEncoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
wav = jax.random.normal(jax.random.key(0), (8, 6400))
proj = jax.random.normal(jax.random.key(1), (cfg.hidden_size, 16)) / np.sqrt(cfg.hidden_size)
def loss(p, w):
  return jnp.mean(jnp.square(nnx.merge(graphdef, p)(w).last_hidden_state @ proj))
ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, wav)
mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), part.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
rules = part.parse_rules([("embed", "fsdp"), ("mlp", "model"), ("heads", "model")])
flat_p = nnx.to_pure_dict(params)
specs = part.shardings_for(flat_p, part.param_logical_axes(params), mesh, rules)
q = specs["encoder"]["layers"]["attention"]["q_proj"]["kernel"].spec
assert q == P(None, "fsdp", "model"), q
placed = jax.device_put(flat_p, specs)
def run(p, w):
  st = jax.tree.map(lambda v: v, params)  # fresh Variables to fill with the placed arrays
  nnx.replace_by_pure_dict(st, p)
  with layer_part.activation_sharding(mesh, part.activation_rules(rules)):
    return jax.value_and_grad(loss)(st, w)
w = jax.device_put(wav, NamedSharding(mesh, P(part.BATCH_AXES)))
got_loss, got_grads = jax.jit(run)(placed, w)
scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref_grads))
err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
          zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads))) / scale
assert abs(float(got_loss) - float(ref_loss)) < 1e-6 and err < 1e-5, (got_loss, ref_loss, err)
print("OK", err)
"""


def test_sharded_scan_keeps_numbers_on_8_devices():
  """Stacked weights placed by the trainer's logical rules ('layers' unmapped, so replicated;
  'embed' over fsdp, 'heads'/'mlp' over model) and activation constraints inside the scanned,
  rematerialised blocks: the same loss and gradients as one device (within 1e-5 of the largest
  gradient entry). HuBERT: WavLM with these rules is off by 0.3% in the loop layout too
  (a separate issue, not the scan's)."""
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, cwd=root,
                        env=env, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
