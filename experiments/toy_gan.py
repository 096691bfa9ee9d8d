r"""A toy GAN on a 1-D two-Gaussian mixture: the Method contract's parameter groups at work.

  python -m jaxspeech.main --config experiments/toy_gan.py:tiny --workdir runs/toy_gan

Two parameter groups (`generator`, `discriminator`), each with its own Adam (`config.optim.<g>`)
inside the one train step; `config.optim.<g>.every` / `.phase` alternate them (tiny: both every
step, the simultaneous-update GAN). Rows come from the cached manifest of
`python -m data_pipelines.tabular two_gaussians` (or `config.data.manifest`). Evaluation during
training (`config.evals.moments`): the generated samples' mean and standard deviation against
the data's (`jaxspeech/eval/sample_moments.py`).

Variants:
  tiny   ~20 s on a 2-core CPU: MLPs 4 -> 32 -> 32 -> 1 and 1 -> 32 -> 32 -> 1, batch 256,
         Adam 2e-3 / 2e-3 (b1 0.5, the usual GAN setting), cosine decay to 5%, 1500 steps.
  paper  the same, 5000 steps (there is no paper: a toy).
"""

from __future__ import annotations

import ml_collections

from experiments import _base

VARIANTS = ('tiny', 'paper')


def _adam(lr: float, every: int = 1, phase: int = 0) -> ml_collections.ConfigDict:
  c = _base.optim_config(name='adam', learning_rate=lr, b1=0.5, b2=0.999, eps=1e-8,
                         weight_decay=0.0, schedule='cosine', warmup_steps=0, end_lr_ratio=0.05,
                         clip_norm=0.0)
  c.every, c.phase = every, phase  # the group updates at steps with step % every == phase
  c.frozen = ''  # regex of this group's parameters that never update
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  if variant not in VARIANTS:
    raise ValueError(f'experiments/toy_gan.py: unknown variant {variant!r} (tiny, paper)')
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''
  c.model = ml_collections.ConfigDict()  # sizes are method fields (no encoder)
  c.data = _base.data_config(batch_size=256, num_samples=1)  # num_samples: unused (no audio)
  c.optim = ml_collections.ConfigDict({'generator': _adam(2e-3), 'discriminator': _adam(2e-3)})
  c.mesh = _base.mesh_config()
  c.train = _base.train_config(num_steps=1500 if variant == 'tiny' else 5000, log_every=100,
                               checkpoint_every=500)
  c.train.eval_every = 500
  c.method = ml_collections.ConfigDict()
  c.method.name = 'toy_gan'
  c.method.noise_dim = 4
  c.method.hidden = 32
  c.method.num_rows = 4096  # rows of the built-in two-Gaussian manifest
  c.evals = ml_collections.ConfigDict()
  c.evals.moments = ml_collections.ConfigDict({'task': 'sample_moments', 'num_samples': 8192})
  c.lock()
  return c
