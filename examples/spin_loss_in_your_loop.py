r"""Spin's swapped-prediction loss in your own training loop, with jaxspeech as a library.

    python examples/spin_loss_in_your_loop.py --steps 20                     # random tiny encoder
    python examples/spin_loss_in_your_loop.py --hf /ckpt/hubert-base-ls960   # an HF checkpoint

Uses only the public API (`jaxspeech.models`, `jaxspeech.interop`, `jaxspeech.ops`) and optax:
no jaxspeech trainer, config or data pipeline. The encoder's top transformer block, a projection
head and a codebook train on synthetic voiced audio; each utterance is seen twice, as is and
speaker-perturbed (`ops.perturb`), and each view predicts the other's Sinkhorn targets
(`ops.sinkhorn`, `ops.swapped_prediction`). Needs jax, flax (which brings optax) and numpy;
`--hf` also needs `safetensors`. Legend: B batch, S samples, T frames, D width, E head, K codes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspeech import interop
from jaxspeech.models import EncoderConfig, SpeechEncoder
from jaxspeech.ops import perturb, sinkhorn, swapped_prediction

EPSILON, SINKHORN_ITERS, TEMPERATURE = 0.02, 3, 0.1  # Spin's spin.yaml values


class SpinModel(nnx.Module):
  """Your model: any encoder + Linear head D -> E + codebook [K, E] with unit rows."""

  def __init__(self, encoder: SpeechEncoder, head_dim: int, codebook_size: int, rngs: nnx.Rngs):
    self.encoder = encoder
    self.head = nnx.Linear(encoder.config.hidden_size, head_dim, rngs=rngs)
    self.codebook = nnx.Param(swapped_prediction.normalize_codebook(
      jax.random.normal(rngs.params(), (codebook_size, head_dim))))


def synthetic_audio(rng: np.random.Generator, batch: int, num_samples: int) -> np.ndarray:
  """Harmonic tones with random pitch and timbre plus noise, peak 0.5. -> [B, S] float32."""
  t = np.arange(num_samples) / 16_000
  f0 = rng.uniform(100, 250, (batch, 1, 1))  # [B, 1, 1]
  amps = rng.uniform(0, 1, (batch, 8, 1)) / np.arange(1, 9)[None, :, None]  # [B, 8, 1]
  wav = np.sum(amps * np.sin(2 * np.pi * f0 * np.arange(1, 9)[None, :, None] * t), axis=1)
  wav += 0.05 * rng.standard_normal(wav.shape)
  return (0.5 * wav / np.abs(wav).max(axis=-1, keepdims=True)).astype(np.float32)


def standardize(x: jax.Array) -> jax.Array:
  """Zero mean, unit variance per utterance (what the encoders are trained on). [B, S]."""
  return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-7)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--hf', default='', help='HF wav2vec2/HuBERT/WavLM folder ("" = random tiny)')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--seconds', type=float, default=1.0)
  p.add_argument('--lr', type=float, default=1e-3)
  args = p.parse_args(argv)

  encoder = (interop.load_encoder(args.hf) if args.hf
             else SpeechEncoder(EncoderConfig.preset('tiny'), rngs=nnx.Rngs(0)))
  model = SpinModel(encoder, head_dim=64, codebook_size=64, rngs=nnx.Rngs(1))
  top = encoder.config.num_hidden_layers - 1
  # Trainable: the top block, the head, the codebook. Frozen parameters go in as constants.
  trainable = nnx.All(nnx.Param, lambda path, _: path[0] in ('head', 'codebook')
                      or path[:4] == ('encoder', 'encoder', 'layers', top))
  graphdef, params, frozen = nnx.split(model, trainable, ...)
  tx = optax.adam(args.lr)
  opt_state = tx.init(params)

  def loss_fn(params, wav, key):
    m = nnx.merge(graphdef, params, frozen)
    view = perturb.perturb_batch(key, wav, jnp.ones(wav.shape, bool))  # [B, S]
    both = standardize(jnp.concatenate([wav, view]))  # [2B, S]
    out = m.encoder(both, jnp.ones(both.shape, bool))
    logits = swapped_prediction.cosine_logits(m.head(out.last_hidden_state), m.codebook[...])
    l1, l2 = jnp.split(logits, 2)  # [B, T, K] each
    mask = out.frame_mask[: wav.shape[0]]  # [B, T]
    q1, q2 = (sinkhorn.sinkhorn(lg, mask, EPSILON, SINKHORN_ITERS) for lg in (l1, l2))
    return swapped_prediction.swapped_prediction_loss(l1, l2, q1, q2, mask, TEMPERATURE)

  @jax.jit
  def train_step(params, opt_state, wav, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, wav, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # Spin keeps the codewords on the unit sphere: renormalise after every update.
    params['codebook'] = jax.tree.map(swapped_prediction.normalize_codebook, params['codebook'])
    return params, opt_state, loss

  rng, key = np.random.default_rng(0), jax.random.key(0)
  initial, losses = nnx.to_pure_dict(params), []  # a snapshot: `params` shares model's Variables
  for step in range(args.steps):
    wav = synthetic_audio(rng, args.batch, int(args.seconds * 16_000))
    params, opt_state, loss = train_step(params, opt_state, wav, jax.random.fold_in(key, step))
    losses.append(float(loss))
    print(f'step {step} loss {losses[-1]:.4f}', flush=True)
  nnx.update(model, params)  # the trained model, ready for your own evaluation
  return {'losses': losses, 'initial': initial, 'final': nnx.to_pure_dict(params), 'model': model}


if __name__ == '__main__':
  main()
