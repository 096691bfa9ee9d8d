"""Speaker-identity linear probes (how much speaker information a representation keeps; Spin
should lower it, SEEDS §1), regularised so that they do not under-report it.

Shape legend: B utterances, T frames, D width, S speakers, N frames sampled.

Protocol (closed set: a speaker classifier can only name speakers it was trained on):
  split    each speaker's utterances are split at random (`split_by_speaker`, 30% held out, at
           least one each side); the probes train on the training utterances and are scored on
           the held-out utterances of the same speakers.
  features every dimension standardised with the training rows' mean / std.
  probe    multinomial logistic regression (scikit-learn `LogisticRegressionCV`, L2, lbfgs)
           whose inverse regularisation C is chosen from `CS` by `FOLDS`-fold cross-validation
           on the training rows only (stratified by speaker; for frames, folds never split an
           utterance: StratifiedGroupKFold), by accuracy, then refitted on all training rows.
           (Until Dec 2: Adam with weight decay 1e-4, train accuracy 1.0, which scored 0.29 where
           a plain `LogisticRegression` scores 0.38 on weak speaker information.)
  levels   utterance: the mean of each utterance's valid frames; frame: `frames_per_utt` frames
           drawn at random (fixed seed) from each utterance.
  chance   1 / S, and `majority_baseline` = held-out accuracy of always naming the most frequent
           training speaker.
The held-out accuracy saturates when the speakers are few and distinct: with only two voices (the
built-in corpus's `test` split) expect 1.0 from any speech representation; probe more voices
(all 8 of the built-in corpus: no `--split`; 10 in ../shared/data/librispeech-excerpt).

Evaluation task `speaker_probe` (`run`, `jaxspeech.eval.registry`), on layer L's features
(`Method.predict_fns` 'features'): {"accuracy" (utterance level, held out), "train_accuracy",
"C", "chance", "majority_baseline", "num_speakers", "num_train", "num_test", "frame_accuracy",
"frame_train_accuracy", "frame_C", "frame_majority_baseline"}.

    config.evals.speaker = {task: 'speaker_probe', split: 'test', layer: 'last'}
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task speaker_probe --layer L
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The grid of C (inverse L2 strength on standardised features): half decades from 1e-4 (all
# weights ~0) to 1e3 (~unregularised). FOLDS: scikit-learn's default k.
CS = tuple(float(c) for c in np.logspace(-4, 3, 15))
FOLDS = 5
MAX_ITER = 1000
FRAMES_PER_UTT = 20


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


def cv_folds(y, groups=None, folds: int = FOLDS, seed: int = 0) -> list[tuple[np.ndarray,
                                                                               np.ndarray]]:
  """The cross-validation splits of the training rows ``y [N]`` (class ids): stratified by class,
  shuffled with `seed`; with ``groups [N]`` (e.g. the utterance of each frame) a group never
  straddles two folds. k = min(`folds`, rows (groups) of the rarest class), at least 2."""
  from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

  y = np.asarray(y)
  if groups is None:
    per_class = np.bincount(np.unique(y, return_inverse=True)[1])
  else:
    first = np.unique(np.asarray(groups), return_index=True)[1]
    per_class = np.bincount(np.unique(y, return_inverse=True)[1][first])
  k = int(np.clip(per_class.min(), 2, folds))
  if groups is None:
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
  else:
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  return list(splitter.split(np.zeros((len(y), 1)), y, groups))


def speaker_probe(
  train_x,
  train_y,
  test_x,
  test_y,
  *,
  groups=None,
  seed: int = 0,
  cs=CS,
  folds: int = FOLDS,
) -> dict[str, float]:
  """Train a cross-validated linear speaker classifier on ``train_x [N, D]`` and score
  ``test_x [M, D]`` (the module's protocol). ``groups [N]``: which utterance each training row
  comes from (frame probes), so that no fold splits an utterance.

  Labels may be any hashable values; test speakers must occur in training.

  Returns:
    ``{"accuracy": held-out accuracy, "train_accuracy": ..., "C": the chosen C,
    "cv_accuracy": its mean cross-validation accuracy, "chance": 1 / S,
    "majority_baseline": ..., "final_loss": training cross-entropy of the refitted probe}``.
  """
  import warnings

  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegressionCV
  from threadpoolctl import threadpool_limits

  classes, ytr = np.unique(np.asarray(train_y), return_inverse=True)
  if len(classes) < 2:
    raise ValueError(f"speaker probe: need at least 2 training speakers, got {len(classes)}")
  lookup = {c: i for i, c in enumerate(classes.tolist())}
  try:
    yte = np.array([lookup[c] for c in np.asarray(test_y).tolist()])
  except KeyError as e:
    raise ValueError(f"test speaker {e} has no training utterance") from None
  xtr = np.asarray(train_x, np.float64)
  xte = np.asarray(test_x, np.float64)
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
  probe = LogisticRegressionCV(Cs=list(cs), l1_ratios=(0.0,), cv=cv_folds(ytr, groups, folds, seed),
                               scoring="accuracy", max_iter=MAX_ITER,
                               use_legacy_attributes=False)
  # One BLAS thread: these problems are small, and threads that spin on a shared 2-core machine
  # made a 140 x 96 fit 15x slower.
  with threadpool_limits(1), warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # near-unregularised end of the grid
    probe.fit(xtr, ytr)
  best = int(np.flatnonzero(np.isclose(probe.Cs_, probe.C_))[0])
  scores = np.asarray(probe.scores_).reshape(-1, len(probe.Cs_))  # [folds, Cs]
  proba = np.clip(probe.predict_proba(xtr)[np.arange(len(ytr)), ytr], 1e-12, 1.0)
  majority = np.bincount(ytr, minlength=len(classes)).argmax()
  return {
    "accuracy": float(np.mean(probe.predict(xte) == yte)),
    "train_accuracy": float(np.mean(probe.predict(xtr) == ytr)),
    "C": float(probe.C_),
    "cv_accuracy": float(scores[:, best].mean()),
    "chance": 1.0 / len(classes),
    "majority_baseline": float(np.mean(yte == majority)),
    "final_loss": float(-np.mean(np.log(proba))),
  }


def sample_frames(feats, idx, frames_per_utt: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """`frames_per_utt` frames drawn without replacement from each utterance `feats[i]` ``[T_i, D]``
  of `idx` (all of a shorter one): ``([N, D] float32, [N] position in idx)``."""
  xs, group = [], []
  for j, i in enumerate(idx):
    f = np.asarray(feats[i])
    pick = np.sort(rng.choice(len(f), min(frames_per_utt, len(f)), replace=False))
    xs.append(f[pick].astype(np.float32))
    group += [j] * len(pick)
  return np.concatenate(xs), np.array(group, np.int64)


def frame_speaker_probe(feats, speakers, train, test, frames_per_utt: int = FRAMES_PER_UTT,
                        seed: int = 0) -> dict[str, float]:
  """The probe on single frames: `frames_per_utt` random frames (fixed `seed`) of each utterance
  ``feats[i] [T_i, D]``, training frames from the utterances `train`, held-out ones from `test`
  (the utterance-level split), folds grouped by utterance. Returns `speaker_probe`'s dict."""
  speakers = np.asarray(speakers)
  rng = np.random.default_rng(seed)
  xtr, gtr = sample_frames(feats, train, frames_per_utt, rng)
  xte, gte = sample_frames(feats, test, frames_per_utt, rng)
  return speaker_probe(xtr, speakers[np.asarray(train)][gtr], xte, speakers[np.asarray(test)][gte],
                       groups=gtr, seed=seed)


def probe_features(feats, speakers, seed: int = 0,
                   frames_per_utt: int = FRAMES_PER_UTT) -> dict[str, float]:
  """Both probes on per-utterance features ``feats[i] [T_i, D]`` of utterances spoken by
  `speakers` (the module's protocol): the evaluation task's dict."""
  from jaxspeech.eval.registry import EvalError

  speakers = np.asarray(speakers)
  train, test = split_by_speaker(speakers, seed=seed)
  if len(test) == 0 or len(np.unique(speakers)) < 2:
    raise EvalError("speaker_probe: need at least 2 speakers with 2+ utterances each")
  x = np.stack([np.asarray(f, np.float32).mean(0) for f in feats])  # [B, D] utterance means
  utt = speaker_probe(x[train], speakers[train], x[test], speakers[test], seed=seed)
  frame = frame_speaker_probe(feats, speakers, train, test, frames_per_utt, seed)
  return {
    "accuracy": utt["accuracy"],
    "train_accuracy": utt["train_accuracy"],
    "C": utt["C"],
    "chance": utt["chance"],
    "majority_baseline": utt["majority_baseline"],
    "num_speakers": float(len(np.unique(speakers))),
    "num_train": float(len(train)),
    "num_test": float(len(test)),
    "frame_accuracy": frame["accuracy"],
    "frame_train_accuracy": frame["train_accuracy"],
    "frame_C": frame["C"],
    "frame_majority_baseline": frame["majority_baseline"],
  }


def evaluate_speaker_probe(ctx, wavs, rows, layer: int, seed: int = 0,
                           frames_per_utt: int = FRAMES_PER_UTT) -> dict[str, float]:
  """Both speaker probes on layer `layer`'s features of the utterances `wavs` of `rows` (with
  speakers): `probe_features`' dict ({"accuracy", ...}, see the module docstring)."""
  from jaxspeech.eval.common import layer_outputs

  feats = layer_outputs(ctx, wavs, layer)
  return probe_features(feats, [r["speaker"] for r in rows], seed, frames_per_utt)


def run(ctx, manifest: str = "", split: str = "", layer="last", seed: int = 0) -> dict[str, float]:
  """The `speaker_probe` task on the rows of `manifest` (default: the run's manifest) of
  `split`."""
  from jaxspeech.eval import common

  rows = common.task_rows(ctx, manifest, split, need_alignment=False)
  li = common.layer_index(ctx, layer)
  return evaluate_speaker_probe(ctx, common.load_wavs(rows), rows, li, int(seed))
