"""Image classification through the Method contract: a non-encoder model on image rows.

Rows are {"image": H*W grey levels row-major, "label": int, "split"} (e.g. the handwritten digit
scans of `python -m data_pipelines.tabular digits`); `host_fields` reshapes them to `image`
float32 [H, W] and `label` int32 [] in the Grain workers; the model is
`jaxspeech.models.small_nets.ImageClassifier`; the loss is softmax cross-entropy; the
prediction function 'labels' (argmax) feeds the `classification` evaluation task, during
training (`config.evals`) and from `python -m jaxspeech.evaluate --task classification`. The
visual side of the audio-visual methods (UAVM, cross-modal code matching) will use the same path.

Legend: B batch, H height, W width, K classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxspeech.methods.base import Method
from jaxspeech.models.small_nets import ImageClassifier


class ImageClassification(Method):
  name = 'image_classifier'
  encoder_path = None
  uses_audio = False

  def __init__(self, config):
    super().__init__(config)
    m = config.method
    self.shape = (int(m.height), int(m.width))
    self.num_classes = int(m.num_classes)

  def init(self, rng):
    m = self.config.method
    model = ImageClassifier(self.num_classes, int(m.channels), float(m.pixel_scale),
                            rngs=nnx.Rngs(params=rng))
    return model, {}

  def row_fields(self):
    return {'image': jax.ShapeDtypeStruct(self.shape, jnp.float32),
            'label': jax.ShapeDtypeStruct((), jnp.int32)}

  def host_fields(self, row):
    image = np.asarray(row['image'], np.float32)
    if image.size != self.shape[0] * self.shape[1]:
      raise ValueError(f'{row.get("id", row.get("path", "row"))}: image has {image.size} values, '
                       f'config.method.height x width = {self.shape}')
    label = int(row['label'])
    if not 0 <= label < self.num_classes:
      raise ValueError(f'{row.get("id", "row")}: label {label} not in 0..{self.num_classes - 1}')
    return {'image': image.reshape(self.shape), 'label': np.int32(label)}

  def default_manifest(self, data_config):
    from data_pipelines.tabular import cached_manifest

    return cached_manifest('digits', str(data_config.cache_dir) or None, test_fraction=0.2,
                           seed=0)

  def loss_fn(self, model: ImageClassifier, extra_state, batch, rng):
    del rng
    logits = model(batch['image'])  # [B, K]
    w = batch['valid'].astype(jnp.float32)  # [B]
    n = jnp.maximum(jnp.sum(w), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])  # [B]
    loss = jnp.sum(w * ce) / n
    acc = jnp.sum(w * (jnp.argmax(logits, -1) == batch['label'])) / n
    return loss, ({'accuracy': acc}, extra_state)

  def predict_fns(self, model, extra_state):
    del extra_state
    return {'labels': lambda batch: jnp.argmax(model(batch['image']), -1).astype(jnp.int32)}
