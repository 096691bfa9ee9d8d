"""Small non-encoder models that prove the Method contract carries any model: an MLP GAN for 1-D
toy data and a convolutional image classifier (handwritten digits). Plain NNX, float32.

Legend: B batch, Z noise width, H height, W width, C channels, K classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Mlp(nnx.Module):
  """Linear -> (LeakyReLU 0.2 -> Linear)*; `[B, in] -> [B, out]`."""

  def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, layer in enumerate(self.layers):
      if i:
        x = jax.nn.leaky_relu(x, 0.2)
      x = layer(x)
    return x


class ToyGan(nnx.Module):
  """Generator `[B, Z] -> [B, 1]` and discriminator `[B, 1] -> [B]` logits, two sub-modules
  (the method's two parameter groups)."""

  def __init__(self, noise_dim: int = 4, hidden: int = 32, *, rngs: nnx.Rngs):
    self.noise_dim = noise_dim
    self.generator = Mlp((noise_dim, hidden, hidden, 1), rngs=rngs)
    self.discriminator = Mlp((1, hidden, hidden, 1), rngs=rngs)

  def sample(self, rng: jax.Array, n: int) -> jax.Array:
    """n generated values `[n, 1]`."""
    return self.generator(jax.random.normal(rng, (n, self.noise_dim)))

  def critic(self, x: jax.Array) -> jax.Array:
    """Real/fake logits `[B, 1] -> [B]`."""
    return self.discriminator(x)[:, 0]


class ImageClassifier(nnx.Module):
  """Two 3x3 convolutions (ReLU, the second with stride 2) -> mean over space -> Linear.
  `[B, H, W] -> [B, K]` logits; inputs are scaled to [0, 1] by `scale`."""

  def __init__(self, num_classes: int = 10, channels: int = 32, scale: float = 1.0 / 16, *,
               rngs: nnx.Rngs):
    self.scale = scale
    self.conv1 = nnx.Conv(1, channels, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels, 2 * channels, (3, 3), strides=(2, 2), rngs=rngs)
    self.head = nnx.Linear(2 * channels, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)[..., None] * self.scale  # [B, H, W, 1]
    x = jax.nn.relu(self.conv1(x))  # [B, H, W, C]
    x = jax.nn.relu(self.conv2(x))  # [B, H/2, W/2, 2C]
    return self.head(jnp.mean(x, axis=(1, 2)))  # [B, K]
