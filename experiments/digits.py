r"""Handwritten digit classification (scikit-learn's 1,797 real 8x8 scans): a non-encoder model
trained and evaluated through the same trainer, data path and evaluators as the speech methods.

  python -m jaxspeech.main --config experiments/digits.py:tiny --workdir runs/digits
  python -m jaxspeech.evaluate --checkpoint runs/digits --task classification --split test

The manifest (`python -m data_pipelines.tabular digits`, cached on first use; or
`config.data.manifest`) splits the images 80/20 by a seeded permutation: test images are never
seen in training. `config.evals.test` reports test accuracy during training.

Variants:
  tiny   ~30 s on a 2-core CPU: two 3x3 convolutions (32, 64 channels) -> mean -> linear,
         batch 64, AdamW 3e-3, 600 steps.
  paper  the same model, 3000 steps (no paper: a check of the contract).
"""

from __future__ import annotations

import ml_collections

from experiments import _base

VARIANTS = ('tiny', 'paper')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/digits.py: unknown variant {variant!r} (tiny, paper)')
  num_steps = 600 if variant == 'tiny' else 3000
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''
  c.model = ml_collections.ConfigDict()  # sizes are method fields (no encoder)
  c.data = _base.data_config(batch_size=64, num_samples=1)  # num_samples: unused (no audio)
  c.optim = _base.optim_config(learning_rate=3e-3, b2=0.999, eps=1e-8, weight_decay=1e-4,
                               schedule='cosine', warmup_steps=50, clip_norm=1.0)
  c.mesh = _base.mesh_config()
  c.train = _base.train_config(num_steps=num_steps, log_every=100, checkpoint_every=300)
  c.train.eval_every = 300
  c.method = ml_collections.ConfigDict()
  c.method.name = 'image_classifier'
  c.method.height = 8
  c.method.width = 8
  c.method.num_classes = 10
  c.method.channels = 32
  c.method.pixel_scale = 1.0 / 16  # load_digits grey levels are 0..16
  c.evals = ml_collections.ConfigDict()
  c.evals.test = ml_collections.ConfigDict({'task': 'classification', 'split': 'test'})
  c.lock()
  return c
