"""HF checkpoints and the scan layout (`scan_layers=True`): a random-init HF model loaded into a
scanned encoder gives the loop encoder's hidden states (1e-5) and HF's (1e-4, as
test_hf_parity), and a scanned encoder saves the very checkpoint the loop encoder saves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.interop import hf
from tests.parity import hf_fixtures
from tests.parity.hf_fixtures import hf_hidden_states, make_hf_model, pad_batch, speech

pytest.importorskip("torch")
pytest.importorskip("transformers")
HF_TOL = 1e-4  # as test_hf_parity: float32 torch vs XLA
LAYOUT_TOL = 1e-5  # same jax computation, scanned or looped


def _hidden(model, wav, mask=None):
  @jax.jit
  def run(w, m):
    out = model(w, m)
    return out.hidden_states + (out.last_hidden_state,), out.frame_mask

  hs, fm = run(jnp.asarray(wav), None if mask is None else jnp.asarray(mask))
  return [np.asarray(h) for h in hs], np.asarray(fm)


@pytest.mark.parametrize(
  "name, overrides",
  [
    # HuBERT-base's architecture (post-LN, group-norm extractor) at 4 layers, to keep it short.
    ("hubert-base-4l", ("HubertModel", "HubertConfig", dict(num_hidden_layers=4))),
    # WavLM: the bucket embedding of HF's layer 0 lives outside the scanned block.
    ("wavlm-stable-ln", None),
  ],
)
def test_scan_encoder_loads_and_saves_hf_checkpoints(name, overrides, tmp_path, monkeypatch):
  if overrides is not None:
    monkeypatch.setitem(hf_fixtures.CONFIGS, name, overrides)
  torch_model = make_hf_model(name)
  torch_model.save_pretrained(tmp_path / "hf")
  loop = hf.load_encoder(tmp_path / "hf")
  scan = hf.load_encoder(tmp_path / "hf", scan_layers=True, remat="full")
  assert scan.config.scan_layers and not loop.config.scan_layers

  wavs = speech()
  batch, mask = pad_batch(wavs)
  got_loop, fm = _hidden(loop, batch, mask)
  got_scan, fm_scan = _hidden(scan, batch, mask)
  np.testing.assert_array_equal(fm, fm_scan)
  assert len(got_scan) == torch_model.config.num_hidden_layers + 2
  for i, (a, b) in enumerate(zip(got_scan, got_loop)):
    np.testing.assert_allclose(a, b, rtol=LAYOUT_TOL, atol=LAYOUT_TOL,
                               err_msg=f"{name} scan vs loop, hidden_states[{i}]")
  for b, w in enumerate(wavs):  # vs HF, one utterance at a time (valid frames of the batch)
    ref = hf_hidden_states(torch_model, w[None])
    t = ref[0].shape[1]
    for i, (a, r) in enumerate(zip(got_scan, ref)):
      err = np.max(np.abs(a[b, :t] - r[0]))
      assert err <= HF_TOL, f"{name} scan vs HF row {b}, hidden_states[{i}]: max abs err {err:.2e}"

  # Saving from the scan layout writes the loop layout's HF checkpoint, key for key.
  sd_loop, sd_scan = hf.to_hf_state_dict(loop), hf.to_hf_state_dict(scan)
  assert sorted(sd_scan) == sorted(sd_loop)
  for k in sd_loop:
    np.testing.assert_array_equal(sd_scan[k], sd_loop[k], err_msg=k)
  hf.save_hf_checkpoint(scan, tmp_path / "out")
  reloaded = getattr(__import__("transformers"), type(torch_model).__name__).from_pretrained(
    tmp_path / "out").eval()
  w = wavs[0][None]
  for i, (a, r) in enumerate(zip(hf_hidden_states(reloaded, w), hf_hidden_states(torch_model, w))):
    np.testing.assert_allclose(a, r, rtol=0, atol=1e-6, err_msg=f"re-saved hidden_states[{i}]")
  assert "scan_layers" not in open(tmp_path / "out" / "config.json").read()
  # param_dtype: the checkpoint is cast into the storage dtype on load.
  bf16 = hf.load_encoder(tmp_path / "hf", scan_layers=True, param_dtype="bfloat16")
  sd_bf16 = hf.to_hf_state_dict(bf16)
  for k in sd_loop:
    want = np.asarray(sd_loop[k].astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(sd_bf16[k], want, err_msg=k)
