"""HF transformers checkpoints (wav2vec2 / HuBERT / WavLM folders) <-> jaxspeech encoders.

    encoder = load_encoder("path/to/hubert-base-ls960")  # config.json + model.safetensors
    save_hf_checkpoint(encoder, "out/")  # loadable by transformers' HubertModel etc.

Importing needs jax, flax and numpy only; reading or writing `model.safetensors` needs the
`safetensors` package, a `pytorch_model.bin` needs torch (`pip install jaxspeech[interop]`).
"""

from jaxspeech.interop import hf
from jaxspeech.interop.hf import (
  TASK_HEADS,
  CheckpointError,
  config_from_hf,
  config_to_hf,
  convert_state_dict,
  feature_extractor_normalizes,
  load_encoder,
  load_hf_checkpoint,
  read_state_dict,
  save_hf_checkpoint,
  to_hf_state_dict,
)

__all__ = [
  "CheckpointError",  # a checkpoint that does not match the encoder (names the keys)
  "TASK_HEADS",  # regex of task-head keys skipped by default (e.g. `lm_head`)
  "config_from_hf",  # HF config.json dict -> EncoderConfig
  "config_to_hf",  # EncoderConfig -> HF config.json dict
  "convert_state_dict",  # flat HF state dict -> nested jaxspeech params
  "feature_extractor_normalizes",  # whether the folder's feature extractor normalises audio
  "hf",  # the module (rules, helpers)
  "load_encoder",  # HF folder -> ready SpeechEncoder
  "load_hf_checkpoint",  # HF folder -> (EncoderConfig, params)
  "read_state_dict",  # HF folder -> flat {name: np.ndarray}
  "save_hf_checkpoint",  # SpeechEncoder -> HF folder (config.json + model.safetensors)
  "to_hf_state_dict",  # SpeechEncoder -> flat HF state dict
]
