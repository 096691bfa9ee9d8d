"""Random-init HF encoders saved with `save_pretrained`, and real speech to run them on."""

from __future__ import annotations

import glob
import os

import numpy as np

from jaxspeech.audio import load_audio

LIBRISPEECH = os.path.join(
  os.path.dirname(__file__), "..", "..", "..", "shared", "data", "librispeech-excerpt"
)

# name -> (HF model class name, config class name, config overrides). Base sizes as the issue asks,
# plus the pre-LN "stable layer norm" + layer-norm extractor variants (large models' architecture)
# at reduced depth to keep the default test run short.
CONFIGS = {
  "hubert-base": ("HubertModel", "HubertConfig", {}),
  "wavlm-base": ("WavLMModel", "WavLMConfig", {}),
  "wav2vec2-base": ("Wav2Vec2Model", "Wav2Vec2Config", {}),
  "wav2vec2-stable-ln": (
    "Wav2Vec2Model",
    "Wav2Vec2Config",
    dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True, num_hidden_layers=4),
  ),
  "wavlm-stable-ln": (
    "WavLMModel",
    "WavLMConfig",
    dict(do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True, num_hidden_layers=4),
  ),
  # data2vec-audio: HF defaults are data2vec-audio-base (5 positional convs of kernel 19).
  "data2vec-audio-base": ("Data2VecAudioModel", "Data2VecAudioConfig", {}),
  "data2vec-audio-small": (
    "Data2VecAudioModel",
    "Data2VecAudioConfig",
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
         conv_dim=(32,) * 7),
  ),
  "hubert-stable-ln-nofeatnorm": (
    "HubertModel",
    "HubertConfig",
    dict(
      do_stable_layer_norm=True,
      feat_extract_norm="layer",
      conv_bias=True,
      feat_proj_layer_norm=False,
      num_hidden_layers=3,
    ),
  ),
}


def make_hf_model(name: str, seed: int = 0):
  import torch
  import transformers

  model_cls, cfg_cls, overrides = CONFIGS[name]
  torch.manual_seed(seed)
  cfg = getattr(transformers, cfg_cls)(**overrides)
  model = getattr(transformers, model_cls)(cfg).eval()
  with torch.no_grad():  # random, non-trivial norm / bias / gate parameters, so that all are tested
    for n, p in model.named_parameters():
      if n.endswith("bias") or "layer_norm.weight" in n or "gru_rel_pos_const" in n:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_hidden_states(model, wav: np.ndarray, mask: np.ndarray | None = None) -> list[np.ndarray]:
  import torch

  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask.astype(np.int64))}
    out = model(torch.from_numpy(wav), output_hidden_states=True, **kw)
  return [h.numpy() for h in out.hidden_states] + [out.last_hidden_state.numpy()]


def speech(n: int = 2, seconds: tuple[float, ...] = (3.0, 2.2)) -> list[np.ndarray]:
  files = sorted(glob.glob(os.path.join(LIBRISPEECH, "*", "*.flac")))
  if not files:
    raise FileNotFoundError(f"no LibriSpeech excerpt under {os.path.abspath(LIBRISPEECH)}")
  picks = [files[0], files[len(files) // 2]][:n]
  return [load_audio(f)[: int(s * 16000)] for f, s in zip(picks, seconds)]


def pad_batch(wavs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  s = max(len(w) for w in wavs)
  batch = np.zeros((len(wavs), s), np.float32)
  mask = np.zeros((len(wavs), s), bool)
  for i, w in enumerate(wavs):
    batch[i, : len(w)] = w
    mask[i, : len(w)] = True
  return batch, mask
