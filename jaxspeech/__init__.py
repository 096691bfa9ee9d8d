"""jaxspeech: self-supervised speech learning in JAX / Flax NNX.

The public API other JAX projects build on imports with the core stack only (jax, flax, numpy;
flax brings optax):

- `jaxspeech.ops`: pure, jit-able array algorithms (Sinkhorn, swapped prediction, k-means,
  codebooks, VQ, span masks, pruning masks, speaker perturbation, EMA distillation).
- `jaxspeech.layers`: reusable NNX layers (conv feature extractor, attention, transformer blocks).
- `jaxspeech.models`: the wav2vec 2.0 / HuBERT / WavLM `SpeechEncoder`.
- `jaxspeech.interop`: HF transformers checkpoints <-> jaxspeech encoders.

The rest (`jaxspeech.methods`, `jaxspeech.train`, `jaxspeech.eval`, the CLIs `jaxspeech.main`,
`extract`, `evaluate`, `demo`) is the training system and needs the full requirements
(Grain, Orbax, ml_collections, clu, soundfile). This file imports nothing, so `import
jaxspeech.ops` costs only what `ops` needs; the import layering is checked by `.importlinter`.
"""
