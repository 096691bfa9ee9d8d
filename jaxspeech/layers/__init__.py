"""Reusable Flax NNX layers of the wav2vec 2.0 / HuBERT / WavLM family, channels last.

Every weight carries logical axis names (`partitioning`: 'embed', 'mlp', 'heads', ...) that a
trainer maps to mesh axes; nothing here needs a mesh. Needs jax, flax and numpy only.
"""

from jaxspeech.layers import partitioning
from jaxspeech.layers.attention import SelfAttention, dense
from jaxspeech.layers.conv_feature_extractor import (
  ConvFeatureExtractor,
  ConvLayer,
  conv_output_lengths,
  lengths_to_mask,
)
from jaxspeech.layers.partitioning import activation_sharding, constrain, logical
from jaxspeech.layers.transformer import (
  ConvPositionalEmbedding,
  FeedForward,
  TransformerBlock,
  activation,
  dropout,
  layer_norm,
)

__all__ = [
  "ConvFeatureExtractor",  # waveform [B, S] -> conv features [B, T, C] + frame mask
  "ConvLayer",  # Conv1d -> (norm) -> GELU
  "ConvPositionalEmbedding",  # grouped-conv positional embedding (weight norm)
  "FeedForward",  # Linear D->F -> activation -> Linear F->D
  "SelfAttention",  # multi-head attention, key padding mask, WavLM gated relative bias
  "TransformerBlock",  # post-LN / pre-LN transformer block
  "activation",  # activation function by HF name ('gelu', 'relu', ...)
  "activation_sharding",  # context: constrain activations to a mesh with logical rules
  "constrain",  # sharding constraint on an activation by logical axis names
  "conv_output_lengths",  # sample lengths -> frame lengths after each conv layer
  "dense",  # nnx.Linear with logical axis names on its kernel and bias
  "dropout",  # functional dropout with an explicit key
  "layer_norm",  # nnx.LayerNorm with logical axis names
  "lengths_to_mask",  # lengths [B] -> bool mask [B, T]
  "logical",  # wraps an initializer with logical axis names
  "partitioning",  # the logical axis names (EMBED, MLP, HEADS, ...) and sharding helpers
]
