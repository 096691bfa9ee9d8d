"""Numerical parity with HF transformers (PyTorch, random init, saved with save_pretrained) on
real LibriSpeech speech: every hidden state within 1e-4 (float32), alone and in padded batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.interop import hf
from tests.parity.hf_fixtures import CONFIGS, hf_hidden_states, make_hf_model, pad_batch, speech

pytest.importorskip("torch")
pytest.importorskip("transformers")
TOL = 1e-4


def _jax_hidden(model, wav, mask=None):
  @jax.jit
  def run(w, m):
    out = model(w, m)
    return out.hidden_states + (out.last_hidden_state,), out.frame_mask

  hs, fm = run(jnp.asarray(wav), None if mask is None else jnp.asarray(mask))
  return [np.asarray(h) for h in hs], np.asarray(fm)


@pytest.fixture(scope="module")
def wavs():
  return speech()


# wav2vec2-base and WavLM-base share HuBERT-base's extractor and their stable-LN variants run by
# default; the two base-size models (~18 s each) are slow, to keep the default run < 20 min.
_SLOW = ("wav2vec2-base", "wavlm-base")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in CONFIGS])
def test_hidden_states_match_transformers(name, wavs, tmp_path):
  torch_model = make_hf_model(name)
  torch_model.save_pretrained(tmp_path)  # model.safetensors + config.json
  model = hf.load_encoder(tmp_path)
  n_layers = torch_model.config.num_hidden_layers

  # One utterance at a time: all L+1 hidden states and last_hidden_state.
  singles_ref = []
  for w in wavs:
    ref = hf_hidden_states(torch_model, w[None])
    got, _ = _jax_hidden(model, w[None])
    assert len(got) == len(ref) == n_layers + 2
    for i, (a, b) in enumerate(zip(got, ref)):
      err = np.max(np.abs(a - b))
      assert err <= TOL, f"{name} single utt, hidden_states[{i}]: max abs err {err:.2e}"
    singles_ref.append(ref)

  # Padded batch: valid frames must equal each utterance run alone (HF, unpadded).
  batch, mask = pad_batch(wavs)
  got, frame_mask = _jax_hidden(model, batch, mask)
  for b, ref in enumerate(singles_ref):
    t = ref[0].shape[1]
    assert frame_mask[b].sum() == t and frame_mask[b, :t].all()
    for i in range(len(ref)):
      err = np.max(np.abs(got[i][b, :t] - ref[i][0]))
      assert err <= TOL, f"{name} padded batch row {b}, hidden_states[{i}]: max abs err {err:.2e}"

  # And equal HF's own padded batch where HF's is padding-exact (layer-norm feature extractors;
  # HF's GroupNorm extractor puts the padding into its statistics, jaxspeech does not).
  if torch_model.config.feat_extract_norm == "layer":
    ref = hf_hidden_states(torch_model, batch, mask)
    for i in range(len(ref)):
      err = max(
        np.max(np.abs(got[i][b, : fm.sum()] - ref[i][b, : fm.sum()]))
        for b, fm in enumerate(frame_mask)
      )
      assert err <= TOL, f"{name} vs HF padded batch, hidden_states[{i}]: max abs err {err:.2e}"


def test_pytorch_bin_checkpoint_loads_the_same(tmp_path, wavs):
  torch_model = make_hf_model("wav2vec2-stable-ln", seed=1)
  torch_model.save_pretrained(tmp_path / "st")
  # Older hub checkpoints: pytorch_model.bin (transformers 5 no longer writes it) with the
  # pre-parametrization weight-norm names weight_g / weight_v.
  import shutil

  import torch

  (tmp_path / "pt").mkdir()
  shutil.copy(tmp_path / "st" / "config.json", tmp_path / "pt" / "config.json")
  sd = {
    k.replace("parametrizations.weight.original0", "weight_g").replace(
      "parametrizations.weight.original1", "weight_v"
    ): v
    for k, v in torch_model.state_dict().items()
  }
  assert any(k.endswith("weight_g") for k in sd)
  torch.save(sd, tmp_path / "pt" / "pytorch_model.bin")
  cfg_a, pa = hf.load_hf_checkpoint(tmp_path / "st")
  cfg_b, pb = hf.load_hf_checkpoint(tmp_path / "pt")
  assert cfg_a == cfg_b
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_export_round_trip_loads_in_transformers(tmp_path, wavs):
  import transformers

  torch_model = make_hf_model("wavlm-stable-ln", seed=2)
  torch_model.save_pretrained(tmp_path / "src")
  model = hf.load_encoder(tmp_path / "src")
  hf.save_hf_checkpoint(model, tmp_path / "out")
  back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
  a = hf_hidden_states(torch_model, wavs[1][None])
  b = hf_hidden_states(back, wavs[1][None])
  for x, y in zip(a, b):
    assert np.max(np.abs(x - y)) <= 1e-5
  # The feature extractor config loads in transformers and says what jaxspeech trains on.
  fe = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "out")
  assert type(fe).__name__ == "Wav2Vec2FeatureExtractor" and fe.do_normalize
  assert fe.return_attention_mask  # a layer-norm extractor (wavlm-stable-ln)
  assert hf.feature_extractor_normalizes(tmp_path / "out")
  hf.save_hf_checkpoint(model, tmp_path / "raw", do_normalize=False)
  assert not transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "raw").do_normalize
  assert not hf.feature_extractor_normalizes(tmp_path / "raw")
