r"""wav2vec-U probe: can the discriminator tell the unpaired text from a PERFECT generator?

    python -m benchmarks.w2vu_probe --text runs/w2vu/text/text-2000-seed1-sil0-end.jsonl \
        [--strides 1,2,3] [--steps 800] [--seed 0]

The GAN can only settle on the true phone mapping if the true mapping's output looks like the
text. This trains the tiny config's discriminator (`experiments/w2vu2.py:tiny`: 64-d, depth 2,
kernel 8, causal, Adam 1e-3 betas 0.5 / 0.98, clip 5, gradient penalty 1) alone, with real =
one-hot text sentences and fake = what a generator that is always right would emit for the
built-in corpus's training utterances:
  transcript  the utterance's exact phone sequence (the same distribution as the text: the
              discriminator should stay at chance),
  stride s    the true phone of every s-th 50 Hz frame (the generator's output grid), runs
              merged, as JOIN segmentation leaves it: phones shorter than the grid vanish and
              repeated phones merge.
It reports the discriminator's accuracy on fresh batches after `--steps` updates (0.5 = cannot
tell; 1.0 = the perfect generator is always caught) and the mean sequence lengths.
One JSON line per case on stdout.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

BATCH = 32


def grid_phones(row: dict, stride: int) -> list[str]:
  """The true phone at every `stride`-th 50 Hz frame centre of `row`, runs merged."""
  n = int(row['n_samples'] * 50 // row.get('sample_rate', 16000))
  out: list[str] = []
  for i in range(0, n, stride):
    t = i * 0.02 + 0.01
    ph = next((a[0] for a in row['alignment'] if a[1] <= t < a[2]), row['alignment'][-1][0])
    if not out or out[-1] != ph:
      out.append(ph)
  return out


def probe(fakes: list[list[str]], text: list[list[str]], steps: int, seed: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from jaxspeech.models.w2vu import Discriminator
  from jaxspeech.ops import gan

  vocab = sorted({p for s in text + fakes for p in s})
  index = {p: i for i, p in enumerate(vocab)}
  v, length = len(vocab), 64

  def table(seqs):
    x = np.zeros((len(seqs), length), np.int32)
    m = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
      s = s[:length]
      x[i, :len(s)] = [index[p] for p in s]
      m[i, :len(s)] = True
    return jnp.asarray(x), jnp.asarray(m)

  fx, fm = table(fakes)
  rx, rm = table(text)
  disc = Discriminator(v, inner_dim=64, kernel=8, depth=2, causal=True, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(disc)
  tx = optax.chain(optax.clip_by_global_norm(5.0),
                   optax.adamw(1e-3, b1=0.5, b2=0.98, eps=1e-6, weight_decay=1e-4))
  opt = tx.init(params)

  def batch(key):
    k1, k2, k3 = jax.random.split(key, 3)
    fi = jax.random.randint(k1, (BATCH,), 0, fx.shape[0])
    ri = jax.random.randint(k2, (BATCH,), 0, rx.shape[0])
    fake = jax.nn.one_hot(fx[fi], v) * fm[fi][..., None]
    real = jax.nn.one_hot(rx[ri], v) * rm[ri][..., None]
    return fake, fm[fi], real, rm[ri], k3

  def loss_fn(params, fake, fmask, real, rmask, key):
    d = nnx.merge(graphdef, params)
    dy, ty = d(fake, fmask), d(real, rmask)  # "generated" logits
    gp = gan.gradient_penalty(lambda z: d(z, None), real, fake, key) / BATCH
    acc = (jnp.mean(dy > 0) + jnp.mean(ty < 0)) / 2
    return jnp.mean(jax.nn.softplus(-dy)) + jnp.mean(jax.nn.softplus(ty)) + gp, acc

  @jax.jit
  def step(params, opt, key):
    (_, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch(key))
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, acc

  @jax.jit
  def accuracy(params, key):
    return loss_fn(params, *batch(key))[1]

  key = jax.random.PRNGKey(seed)
  for _ in range(steps):
    key, k = jax.random.split(key)
    params, opt, _ = step(params, opt, k)
  accs = [float(accuracy(params, k)) for k in jax.random.split(key, 20)]
  return {'accuracy': float(np.mean(accs)), 'fake_len': float(np.mean([len(f) for f in fakes])),
          'text_len': float(np.mean([len(s) for s in text]))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--text', required=True, help='text manifest (python -m data_pipelines.text)')
  p.add_argument('--strides', default='1,2,3')
  p.add_argument('--steps', type=int, default=800)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args(argv)
  from data_pipelines import synth
  from data_pipelines.manifest import read_manifest
  from data_pipelines.text import read_text_manifest

  rows = [r for r in read_manifest(synth.built_in_corpus()) if r['split'] == 'train']
  text = read_text_manifest(args.text)
  cases = [('transcript', [r['phones'].split() for r in rows])]
  cases += [(f'stride {s}', [grid_phones(r, int(s)) for r in rows])
            for s in args.strides.split(',')]
  for name, fakes in cases:
    out = {'case': name, 'steps': args.steps, 'seed': args.seed,
           **probe(fakes, text, args.steps, args.seed)}
    print(json.dumps(out), flush=True)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
