"""Numerical parity with HF transformers (PyTorch, random init, saved with save_pretrained) on
real LibriSpeech speech: every hidden state within 1e-4 (float32), alone and in padded batches;
and jaxspeech-initialised encoders saved for transformers (data2vec-audio)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.interop import hf
from jaxspeech.layers.transformer import DeepConvPositionalEmbedding
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder
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
# default; the base-size models (~18 s each) are slow, to keep the default run < 20 min
# (data2vec-audio-small runs data2vec-audio-base's architecture at 2 layers of width 32).
_SLOW = ("wav2vec2-base", "wavlm-base", "data2vec-audio-base")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in CONFIGS])
def test_hidden_states_match_transformers(name, wavs, tmp_path, monkeypatch):
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
  # data2vec-audio's HF positional conv stack is not padding-exact either: padded frames, non-zero
  # after its first conv, feed the later ones, which jaxspeech prevents by zeroing them before
  # each conv (`DeepConvPositionalEmbedding`). Without that zeroing its padded batch is HF's.
  if torch_model.config.model_type == "data2vec-audio":
    call = DeepConvPositionalEmbedding.__call__
    monkeypatch.setattr(DeepConvPositionalEmbedding, "__call__",
                        lambda self, x, frame_mask=None: call(self, x, None))
    got, frame_mask = _jax_hidden(model, batch, mask)
  # (Data2VecAudioConfig has no feat_extract_norm: its extractor is always layer-normed.)
  if getattr(torch_model.config, "feat_extract_norm", "layer") == "layer":
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


def test_data2vec_audio_saved_by_jaxspeech_matches_transformers(tmp_path, wavs):
  """jaxspeech -> HF: a jaxspeech-initialised data2vec-audio encoder (random biases everywhere,
  LayerDrop on) saved with `save_hf_checkpoint` loads in transformers as Data2VecAudioModel with
  the same config and the same hidden states (1e-4); loaded back, every parameter is exact."""
  import transformers

  cfg = EncoderConfig.preset(
    "data2vec-audio-base", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, conv_dim=(32,) * 7, layerdrop=0.05,
  )
  model = SpeechEncoder(cfg, rngs=nnx.Rngs(3))
  state = nnx.state(model, nnx.Param)  # norm parameters away from their 1 / 0 init
  keys = iter(jax.random.split(jax.random.key(4), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape),
                                 state))
  hf.save_hf_checkpoint(model, tmp_path)
  back = transformers.AutoModel.from_pretrained(tmp_path).eval()
  assert type(back).__name__ == "Data2VecAudioModel"
  c = back.config
  assert (c.num_conv_pos_embeddings, c.conv_pos_kernel_size, c.num_conv_pos_embedding_groups,
          c.layerdrop) == (5, 19, 16, 0.05)
  for w in wavs:
    ref = hf_hidden_states(back, w[None])
    got, _ = _jax_hidden(model, w[None])
    assert len(got) == len(ref) == cfg.num_hidden_layers + 2
    for i, (a, b) in enumerate(zip(got, ref)):
      err = np.max(np.abs(a - b))
      assert err <= TOL, f"jaxspeech -> HF, hidden_states[{i}]: max abs err {err:.2e}"
  reloaded = hf.load_encoder(tmp_path)
  assert reloaded.config == cfg
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
               nnx.to_pure_dict(nnx.state(reloaded, nnx.Param)))


def test_data2vec_audio_base_preset_is_transformers_default():
  """The `data2vec-audio-base` preset is `Data2VecAudioConfig()` (facebook/data2vec-audio-base)
  but for the dropout rates, which the presets leave at 0, and it round-trips through
  `config_to_hf` / `config_from_hf`."""
  import dataclasses

  import transformers

  d = transformers.Data2VecAudioConfig().to_dict()
  cfg = hf.config_from_hf(d)
  rates = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout",
           "layerdrop")
  assert (cfg.layerdrop, cfg.hidden_dropout) == (d["layerdrop"], d["hidden_dropout"]) == (0.1, 0.1)
  preset = EncoderConfig.preset("data2vec-audio-base")
  assert dataclasses.replace(cfg, **{r: getattr(preset, r) for r in rates}) == preset
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  # HF's other families have no positional conv stack: such an encoder is not written as one.
  with pytest.raises(hf.CheckpointError, match="data2vec-audio"):
    hf.config_to_hf(EncoderConfig.preset("tiny", pos_conv_depth=5))
