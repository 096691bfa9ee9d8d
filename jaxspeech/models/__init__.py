"""Models built from `jaxspeech.layers`: the wav2vec 2.0 / HuBERT / WavLM `SpeechEncoder`.

    encoder = SpeechEncoder(EncoderConfig.preset("tiny"), rngs=nnx.Rngs(0))
    out = encoder(wav, wav_mask)  # [B, S] -> out.last_hidden_state [B, T, D], out.frame_mask

Pretrained HF checkpoints load through `jaxspeech.interop.load_encoder`. Needs jax, flax and numpy
only.
"""

from jaxspeech.models.encoders import layer_features
from jaxspeech.models.speech_encoder import (
  MODEL_TYPES,
  PRESETS,
  EncoderConfig,
  EncoderOutput,
  SpeechEncoder,
  frozen_mask,
)

__all__ = [
  "EncoderConfig",  # architecture dataclass; field names follow HF configs; `.preset(name)`
  "EncoderOutput",  # hidden_states, last_hidden_state, frame_mask, features
  "MODEL_TYPES",  # 'wav2vec2', 'hubert', 'wavlm', 'data2vec-audio'
  "PRESETS",  # name -> EncoderConfig ('hubert-base', 'wavlm-large', 'tiny', ...)
  "SpeechEncoder",  # the NNX encoder: waveform [B, S] -> frames [B, T, D]
  "frozen_mask",  # bool pytree: which parameters a regex list leaves trainable
  "layer_features",  # hidden_states[layer] of an encoder (final state for the last layer)
]
