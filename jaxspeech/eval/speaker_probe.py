"""Speaker-identity linear probe on utterance-mean features (how much speaker information a
representation keeps; Spin should lower it, SEEDS §1).

Shape legend: B utterances, T frames, D width, S speakers.

Protocol: mean-pool each utterance's valid frames, standardise with the training utterances'
mean/std, train a linear softmax classifier (full batch, Adam, a little weight decay) on some
utterances of each speaker, report accuracy on held-out utterances of the same speakers.

Evaluation task `speaker_probe` (`run`, `jaxspeech.eval.registry`): the probe on the utterance
means of layer L's features (`Method.predict_fns` 'features'): {"accuracy"}.

    config.evals.speaker = {task: 'speaker_probe', split: 'test', layer: 'last'}
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task speaker_probe --layer L
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def utterance_means(features: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over valid frames: ``features [B, T, D]``, ``mask [B, T]`` -> ``[B, D]`` float32."""
  m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  return jnp.sum(features.astype(jnp.float32) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


def split_by_speaker(
  speakers, test_fraction: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Indices ``(train, test)``: each speaker's utterances split at random, at least one each side
  for speakers with two or more utterances (single-utterance speakers go to train)."""
  speakers = np.asarray(speakers)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for s in np.unique(speakers):
    idx = rng.permutation(np.flatnonzero(speakers == s))
    n_test = 0 if len(idx) < 2 else int(np.clip(round(len(idx) * test_fraction), 1, len(idx) - 1))
    test.extend(idx[:n_test].tolist())
    train.extend(idx[n_test:].tolist())
  return np.sort(np.array(train, np.int64)), np.sort(np.array(test, np.int64))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _train_linear(x, y, key, num_classes, steps, learning_rate, weight_decay):
  d = x.shape[-1]
  params = {"w": 0.01 * jax.random.normal(key, (d, num_classes)), "b": jnp.zeros((num_classes,))}
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  opt = tx.init(params)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]  # [B, S]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, _):
    p, o = carry
    loss, g = jax.value_and_grad(loss_fn)(p)
    upd, o = tx.update(g, o, p)
    return (optax.apply_updates(p, upd), o), loss

  (params, _), losses = jax.lax.scan(step, (params, opt), None, length=steps)
  return params, losses


def speaker_probe(
  train_x,
  train_y,
  test_x,
  test_y,
  steps: int = 500,
  learning_rate: float = 1e-2,
  weight_decay: float = 1e-4,
  seed: int = 0,
) -> dict[str, float]:
  """Train a linear speaker classifier on ``train_x [B, D]`` and score ``test_x``.

  Labels may be any hashable values; test speakers must occur in training.

  Returns:
    ``{"accuracy": held-out accuracy, "train_accuracy": ..., "chance": 1 / S,
    "final_loss": ...}``.
  """
  classes, ytr = np.unique(np.asarray(train_y), return_inverse=True)
  lookup = {c: i for i, c in enumerate(classes.tolist())}
  try:
    yte = np.array([lookup[c] for c in np.asarray(test_y).tolist()])
  except KeyError as e:
    raise ValueError(f"test speaker {e} has no training utterance") from None
  xtr = np.asarray(train_x, np.float32)
  xte = np.asarray(test_x, np.float32)
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  params, losses = _train_linear(jnp.asarray(xtr), jnp.asarray(ytr), jax.random.key(seed),
                                 len(classes), steps, learning_rate, weight_decay)
  pred = lambda x: np.asarray(jnp.argmax(jnp.asarray(x) @ params["w"] + params["b"], -1))
  return {
    "accuracy": float(np.mean(pred(xte) == yte)),
    "train_accuracy": float(np.mean(pred(xtr) == ytr)),
    "chance": 1.0 / len(classes),
    "final_loss": float(losses[-1]),
  }


def evaluate_speaker_probe(ctx, wavs, rows, layer: int, seed: int = 0) -> dict[str, float]:
  """Speaker-probe accuracy on the utterance means of layer `layer`'s features of the utterances
  `wavs` of `rows` (with speakers): {"accuracy"}."""
  from jaxspeech.eval.common import layer_outputs
  from jaxspeech.eval.registry import EvalError

  feats = layer_outputs(ctx, wavs, layer)
  x = np.stack([f.astype(np.float32).mean(0) for f in feats])  # [B, D] utterance means
  speakers = np.array([r["speaker"] for r in rows])
  train, test = split_by_speaker(speakers, seed=seed)
  if len(test) == 0 or len(np.unique(speakers)) < 2:
    raise EvalError("speaker_probe: need at least 2 speakers with 2+ utterances each")
  r = speaker_probe(x[train], speakers[train], x[test], speakers[test], seed=seed)
  return {"accuracy": r["accuracy"]}


def run(ctx, manifest: str = "", split: str = "", layer="last", seed: int = 0) -> dict[str, float]:
  """The `speaker_probe` task on the rows of `manifest` (default: the run's manifest) of
  `split`."""
  from jaxspeech.eval import common

  rows = common.task_rows(ctx, manifest, split, need_alignment=False)
  li = common.layer_index(ctx, layer)
  return evaluate_speaker_probe(ctx, common.load_wavs(rows), rows, li, int(seed))
