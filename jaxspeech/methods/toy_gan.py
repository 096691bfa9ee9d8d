"""A toy GAN through the Method contract: two parameter groups, two optimizers, one step.

The data are rows {"x": float} of a 1-D two-Gaussian mixture (`data_pipelines.tabular`); the
generator maps noise to x, the discriminator tells real from generated. Standard GAN losses
(Goodfellow et al., 2014) with the non-saturating generator loss:

    L_D = -log D(x_real) - log(1 - D(G(z)))       (group `discriminator`)
    L_G = -log D(G(z))                             (group `generator`)

The shared step differentiates each loss for its own group only, clips and updates each with its
own `config.optim.<group>` block, on the steps its `every` / `phase` select. It is the smallest
stand-in for wav2vec-U's and HiFi-GAN's generator/discriminator pairs.

Legend: B batch, Z noise width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxspeech.methods.base import Method
from jaxspeech.models.small_nets import ToyGan


class ToyGanMethod(Method):
  name = 'toy_gan'
  encoder_path = None
  uses_audio = False

  def init(self, rng):
    m = self.config.method
    return ToyGan(int(m.noise_dim), int(m.hidden), rngs=nnx.Rngs(params=rng)), {}

  def param_groups(self, params):
    return {g: _subtree_mask(params, g) for g in ('generator', 'discriminator')}

  def row_fields(self):
    return {'x': jax.ShapeDtypeStruct((), jnp.float32)}

  def host_fields(self, row):
    return {'x': np.float32(row['x'])}

  def default_manifest(self, data_config):
    from data_pipelines.tabular import cached_manifest

    return cached_manifest('two_gaussians', str(data_config.cache_dir) or None,
                           num_rows=int(self.config.method.num_rows), seed=0)

  def loss_fn(self, model: ToyGan, extra_state, batch, rng):
    real = batch['x'][:, None]  # [B, 1]
    w = batch['valid'].astype(jnp.float32)  # [B]
    n = jnp.maximum(jnp.sum(w), 1.0)
    fake = model.sample(rng, real.shape[0])  # [B, 1]
    d_real, d_fake = model.critic(real), model.critic(fake)  # [B]
    # -log sigmoid(a) = softplus(-a); -log(1 - sigmoid(a)) = softplus(a)
    loss_d = jnp.sum(w * (jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake))) / n
    loss_g = jnp.sum(w * jax.nn.softplus(-d_fake)) / n
    metrics = {'d_real_prob': jnp.sum(w * jax.nn.sigmoid(d_real)) / n,
               'd_fake_prob': jnp.sum(w * jax.nn.sigmoid(d_fake)) / n,
               'fake_mean': jnp.mean(fake), 'fake_std': jnp.std(fake)}
    return {'generator': loss_g, 'discriminator': loss_d}, (metrics, extra_state)

  def predict_fns(self, model, extra_state):
    del extra_state
    return {'samples': lambda rng, n: model.sample(rng, n)}


def _subtree_mask(params, part: str):
  """True for the leaves under `params[part]`, False elsewhere."""
  return {k: jax.tree.map(lambda _, k=k: k == part, v) for k, v in params.items()}
