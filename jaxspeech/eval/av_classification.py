"""Evaluation task `av_classification`: accuracy of an audio-visual classifier on the rows of one
split from the audio alone, the video alone and both, and optionally a modality-classifier probe
on every layer.

    config.evals.test = {task: 'av_classification', split: 'test'}
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task av_classification --split test \
        [--fit_split test]

Returns {'audio', 'visual', 'av', 'num_examples'}: accuracies of the model's `av_logits`
prediction (`Method.predict_fns`; e.g. `jaxspeech.methods.uavm`) with modality 'audio',
'visual' and 'av'. With `fit_split` also the modality probe of UAVM (Fig. 2 of the paper; the
reference's `check_modality_classification_summary.py`): for each layer l, a logistic-regression
classifier learns audio-vs-video from the layer's masked-mean hidden state (`av_layers`; each
row gives one audio and one video example) and is scored on examples it was not fitted on:
'probe/layer_<l>' = its accuracy (0.5 = the layer does not tell the modalities apart:
modality-agnostic; 1.0 = fully modality-specific). `fit_split` = `split` (the reference's
protocol): fitted on a seeded half of the evaluated rows, scored on the other half (same
speakers / images, no distribution shift between fit and score); another split (e.g. 'train'):
fitted on its rows, scored on all the evaluated rows.

Rows are batched through the method's own `host_fields`, padded to `batch_size` rows (one
compilation).
"""

from __future__ import annotations

import numpy as np


def row_batches(ctx, rows: list[dict], batch_size: int):
  """Batches of the rows' host fields (+ index, valid), each padded to `batch_size` rows."""
  import jax.numpy as jnp

  spec = ctx.method.row_fields()
  for start in range(0, len(rows), batch_size):
    chunk = [ctx.method.host_fields(r) for r in rows[start:start + batch_size]]
    n = len(chunk)
    batch = {}
    for k, s in spec.items():
      x = np.zeros((batch_size, *s.shape), s.dtype)
      x[:n] = np.stack([np.asarray(f[k], s.dtype) for f in chunk])
      batch[k] = jnp.asarray(x)
    batch['index'] = jnp.arange(start, start + batch_size, dtype=jnp.int32)
    batch['valid'] = jnp.asarray(np.arange(batch_size) < n)
    yield n, batch


def predict_all(ctx, rows: list[dict], kind: str, modality: str, batch_size: int):
  """`ctx.predict[kind](batch, modality)` over the rows: 'av_logits' -> `[N, K]`; 'av_layers'
  -> one `[N, D_l]` array per layer."""
  import jax

  fn = jax.jit(ctx.need(kind), static_argnums=1)
  out = []
  for n, batch in row_batches(ctx, rows, batch_size):
    y = fn(batch, modality)
    out.append([np.asarray(a)[:n] for a in y] if kind == 'av_layers' else np.asarray(y)[:n])
  if kind == 'av_layers':
    return [np.concatenate(layer) for layer in zip(*out)]
  return np.concatenate(out)


def modality_probe(fit_audio, fit_visual, eval_audio, eval_visual, seed: int = 0) -> list[float]:
  """Per layer, accuracy of an audio-vs-video logistic-regression classifier fitted on the `fit`
  representations and scored on the `eval` ones; the reference's classifier
  (`YuanGongND/uavm` src/embedding/check_modality_classification_summary.py: L1 penalty,
  liblinear, C = 1, raw features). Each argument: one `[N, D_l]` array per layer (N may differ
  between arguments) -> one accuracy per layer."""
  import warnings

  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression

  if not len(fit_audio) == len(fit_visual) == len(eval_audio) == len(eval_visual):
    raise ValueError(f'modality_probe: layer counts differ ({len(fit_audio)}, {len(fit_visual)}, '
                     f'{len(eval_audio)}, {len(eval_visual)})')
  out = []
  for layer in range(len(fit_audio)):
    x = np.concatenate([fit_audio[layer], fit_visual[layer]])
    y = np.r_[np.zeros(len(fit_audio[layer])), np.ones(len(fit_visual[layer]))]
    clf = LogisticRegression(l1_ratio=1.0, solver='liblinear', random_state=seed)  # L1
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', ConvergenceWarning)
      clf.fit(x, y)
    xe = np.concatenate([eval_audio[layer], eval_visual[layer]])
    ye = np.r_[np.zeros(len(eval_audio[layer])), np.ones(len(eval_visual[layer]))]
    out.append(float(clf.score(xe, ye)))
  return out


def run(ctx, split: str = 'test', manifest: str = '', fit_split: str = '', batch_size: int = 250,
        label_field: str = 'label', seed: int = 0) -> dict[str, float]:
  from jaxspeech.eval.classification import accuracy
  from jaxspeech.eval.registry import EvalError

  ctx.need('av_logits')
  rows = ctx.rows(split, manifest)
  missing = [i for i, r in enumerate(rows) if label_field not in r]
  if missing:
    raise EvalError(f'av_classification: {len(missing)} rows of split {split!r} have no '
                    f'{label_field!r} (e.g. row {missing[0]})')
  target = np.asarray([int(r[label_field]) for r in rows])
  out = {}
  for modality in ('audio', 'visual', 'av'):
    logits = predict_all(ctx, rows, 'av_logits', modality, batch_size)
    out[modality] = accuracy(np.argmax(logits, -1), target)
  out['num_examples'] = float(len(rows))
  if fit_split:
    ctx.need('av_layers')
    if fit_split == split:  # the reference's protocol: fit on one half, score on the other
      order = np.random.default_rng(seed).permutation(len(rows))
      half = len(rows) // 2
      fit_rows, rows = [rows[i] for i in order[:half]], [rows[i] for i in order[half:]]
    else:
      fit_rows = ctx.rows(fit_split, manifest)
    reps = {(name, m): predict_all(ctx, rs, 'av_layers', m, batch_size)
            for name, rs in (('fit', fit_rows), ('eval', rows)) for m in ('audio', 'visual')}
    accs = modality_probe(reps['fit', 'audio'], reps['fit', 'visual'], reps['eval', 'audio'],
                          reps['eval', 'visual'], seed)
    out.update({f'probe/layer_{i}': a for i, a in enumerate(accs)})
  return out
