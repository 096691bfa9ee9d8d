"""Pure, jit-able array algorithms: one module per algorithm, each with a shape legend.

Import the module and call its functions, e.g.::

    from jaxspeech.ops import sinkhorn, swapped_prediction
    q = sinkhorn.sinkhorn(logits, mask, epsilon=0.02, num_iters=3)  # [B, T, K]
    out = swapped_prediction.spin_loss(z1, z2, codebook, mask)  # .loss, .accuracy

The modules, not their functions, are the names of this package: `sinkhorn` is both a module and
its main function, and the rest of jaxspeech imports them as modules (`from jaxspeech.ops import
perturb`). Needs jax and numpy only.
"""

from jaxspeech.ops import (
  codebook,
  distillation,
  kmeans,
  masking,
  mel,
  perturb,
  pruning,
  sinkhorn,
  swapped_prediction,
  vocoder_losses,
  vq,
)

__all__ = [
  "codebook",  # DinoSR online EMA codebooks, nearest-codeword assignment
  "distillation",  # EMA teacher, teacher decay schedule, instance norm over time
  "kmeans",  # masked batched k-means (k-means++, Lloyd, minibatch)
  "masking",  # span masks with an exact number of masked frames
  "mel",  # HiFi-GAN log-mel (librosa's Slaney filters), STFT / iSTFT, Griffin-Lim
  "perturb",  # speaker perturbation (formant / pitch / EQ) on a padded batch
  "pruning",  # magnitude pruning masks on pytrees (PARP, OMP, IMP)
  "sinkhorn",  # log-domain Sinkhorn-Knopp equipartition targets
  "swapped_prediction",  # Spin's swapped-prediction loss
  "vocoder_losses",  # HiFi-GAN / Parallel WaveGAN losses (LSGAN, feature matching, MR-STFT)
  "vq",  # straight-through VQ, EMA codebooks, cross-modal code matching
]
