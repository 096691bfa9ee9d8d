"""Unit quality against frame phone labels: PNMI, phone purity, cluster purity (HuBERT, §IV-B).

Shape legend: N frames (any leading shape such as ``[B, T]``, flattened), P phone classes,
U unit ids.

From the frame pairs (phone ``y``, unit ``z``) of the valid frames, the joint distribution is
``p(y, z) = count(y, z) / N`` and (Hsu et al., HuBERT, 2021)::

  phone purity   = E_z[max_y p(y | z)] = sum_z max_y p(y, z)
  cluster purity = E_y[max_z p(z | y)] = sum_y max_z p(y, z)
  PNMI           = I(y; z) / H(y)

The same ratio with speaker labels in place of phones, ``speaker_nmi = I(s; z) / H(s)``, is the
fraction of the speaker identity the units reveal (0 = speaker-invariant units, 1 = the units
determine the speaker): a unit-level speaker measure that does not saturate like a probe does.

Labels may be any hashable values (ints, strings); numpy is enough here (the statistics are a
single pass over the frames).

Evaluation task `units` (`run`, `jaxspeech.eval.registry`): units of layer L -- k-means
(`jaxspeech.ops.kmeans`, K clusters, 50 Lloyd iterations from k-means++, on the raw features as
HuBERT's recipe; `standardize` z-scores them first) fitted on the evaluated frames or on the
frames of another split (`fit_split`: fairseq fits k-means on training data and labels held-out
sets with it), or with `units=True` the model's own units (`Method.predict_fns` 'units': Spin's
codebook, DinoSR's codebook of layer L) -- scored against 50 Hz frame phone labels:
{"pnmi", "phone_purity", "cluster_purity"}, plus "speaker_nmi" given >= 2 speakers.

    config.evals.units = {task: 'units', split: 'test', layer: 'last', k: 50}
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task units --layer L --k K
"""

from __future__ import annotations

import numpy as np


def contingency(phones, units, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Counts ``[P, U]`` of (phone, unit) pairs over valid frames, with the phone and unit values.

  Args:
    phones: ``[...]`` frame phone labels.
    units: ``[...]`` frame unit ids (same shape).
    mask: optional ``[...]`` bool, True = frame counts.

  Returns:
    ``(counts [P, U] int64, phone_values [P], unit_values [U])`` for the values that occur.
  """
  phones, units = np.asarray(phones).reshape(-1), np.asarray(units).reshape(-1)
  if phones.shape != units.shape:
    raise ValueError(f"phones {phones.shape} and units {units.shape} differ in size")
  if mask is not None:
    keep = np.asarray(mask, bool).reshape(-1)
    phones, units = phones[keep], units[keep]
  pv, pi = np.unique(phones, return_inverse=True)
  uv, ui = np.unique(units, return_inverse=True)
  counts = np.zeros((len(pv), len(uv)), np.int64)
  np.add.at(counts, (pi, ui), 1)
  return counts, pv, uv


def _xlogx_ratio(p_yz, p_y, p_z):
  nz = p_yz > 0
  return np.sum(p_yz[nz] * np.log(p_yz[nz] / np.outer(p_y, p_z)[nz]))


def scores_from_counts(counts: np.ndarray) -> dict[str, float]:
  """PNMI, phone purity, cluster purity (and the entropies) from a ``[P, U]`` count table."""
  counts = np.asarray(counts, np.float64)
  n = counts.sum()
  if n == 0:
    raise ValueError("no valid frames")
  p_yz = counts / n  # [P, U]
  p_y, p_z = p_yz.sum(1), p_yz.sum(0)  # [P], [U]
  h_y = -np.sum(p_y[p_y > 0] * np.log(p_y[p_y > 0]))
  h_z = -np.sum(p_z[p_z > 0] * np.log(p_z[p_z > 0]))
  mi = _xlogx_ratio(p_yz, p_y, p_z)
  return {
    # H(y) = 0 (one phone only): nothing to explain; report 0 information as 0 PNMI.
    "pnmi": float(mi / h_y) if h_y > 0 else 0.0,
    "phone_purity": float(p_yz.max(0).sum()),
    "cluster_purity": float(p_yz.max(1).sum()),
    "mutual_information": float(mi),
    "phone_entropy": float(h_y),
    "unit_entropy": float(h_z),
    "unit_perplexity": float(np.exp(h_z)),
    "num_units_used": int((p_z > 0).sum()),
    "num_frames": int(n),
  }


def unit_quality(phones, units, mask=None) -> dict[str, float]:
  """All unit-quality scores for frame phone labels and unit ids (see the module docstring)."""
  counts, _, _ = contingency(phones, units, mask)
  return scores_from_counts(counts)


def pnmi(phones, units, mask=None) -> float:
  """Phone-normalised mutual information ``I(y; z) / H(y)``."""
  return unit_quality(phones, units, mask)["pnmi"]


def phone_purity(phones, units, mask=None) -> float:
  """``E_z[max_y p(y | z)]``: accuracy of labelling each unit by its majority phone."""
  return unit_quality(phones, units, mask)["phone_purity"]


def cluster_purity(phones, units, mask=None) -> float:
  """``E_y[max_z p(z | y)]``: how concentrated each phone is on its most frequent unit."""
  return unit_quality(phones, units, mask)["cluster_purity"]


def speaker_nmi(speakers, units, mask=None) -> float:
  """``I(s; z) / H(s)``: the share of the speaker entropy explained by the units, ``[N]`` frame
  speaker labels and unit ids (lower = more speaker-invariant units). Needs >= 2 speakers."""
  counts, values, _ = contingency(speakers, units, mask)
  if len(values) < 2:
    raise ValueError(f"speaker_nmi needs frames of at least 2 speakers, got {len(values)}")
  return scores_from_counts(counts)["pnmi"]


# ---------------------------------------------------------------------------------------------
# The evaluation task.


def score_units(units, rows) -> dict[str, float]:
  """Per-utterance unit arrays `[T_i]` of `rows` (with alignments) scored against their frame
  phones: {"pnmi", "phone_purity", "cluster_purity"}, plus "speaker_nmi" when the rows hold >= 2
  speakers."""
  from jaxspeech.eval.common import frame_phone_labels

  labels = frame_phone_labels(rows, [len(u) for u in units])
  y, u = np.concatenate(labels), np.concatenate(units)
  r = unit_quality(y, u, y >= 0)
  out = {"pnmi": r["pnmi"], "phone_purity": r["phone_purity"],
         "cluster_purity": r["cluster_purity"]}
  speakers = np.concatenate([[row.get("speaker", "")] * len(v) for row, v in zip(rows, units)])
  if len(set(speakers.tolist())) >= 2:
    out["speaker_nmi"] = speaker_nmi(speakers, u)
  return out


def kmeans_units(ctx, wavs, layer: int, k: int, seed: int = 0, kmeans_iters: int = 50,
                 standardize: bool = False, fit_wavs=None) -> list[np.ndarray]:
  """k-means units of layer `layer`'s features (`ctx.predict['features']`), one `[T_i]` array
  per utterance of `wavs`. k-means runs on the raw features, as HuBERT's recipe (fairseq
  `learn_kmeans.py`); `standardize` z-scores every dimension first (statistics of the fitted
  frames). It is fitted on the frames of `fit_wavs` when given (e.g. the training speakers), else
  on the evaluated frames themselves; the evaluated frames get their nearest centroid."""
  import jax
  import jax.numpy as jnp

  from jaxspeech.eval.common import features_fn, utterance_outputs
  from jaxspeech.eval.registry import EvalError
  from jaxspeech.ops import kmeans

  fn = features_fn(ctx, layer)
  feats = utterance_outputs(wavs, fn, normalize=ctx.normalize)
  x = np.concatenate(feats).astype(np.float32)
  x_fit = x if fit_wavs is None else np.concatenate(
    utterance_outputs(fit_wavs, fn, normalize=ctx.normalize)).astype(np.float32)
  if len(x_fit) < k:
    raise EvalError(f"--k {k}: only {len(x_fit)} frames to cluster")
  if standardize:
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-5
    x, x_fit = (x - mean) / std, (x_fit - mean) / std
  fit = jax.jit(kmeans.kmeans_fit, static_argnums=(2, 3))
  centroids, _ = fit(jnp.asarray(x_fit), None, k, kmeans_iters, jax.random.key(seed))
  ids = np.asarray(kmeans.kmeans_assign(jnp.asarray(x), centroids)[0])
  return np.split(ids, np.cumsum([len(f) for f in feats])[:-1])


def predicted_units(ctx, wavs, layer: int) -> list[np.ndarray]:
  """The model's own units of layer `layer` (`ctx.predict['units']`), one `[T_i]` array per
  utterance."""
  import jax

  from jaxspeech.eval.common import utterance_outputs
  from jaxspeech.eval.registry import EvalError

  if "units" not in ctx.predict:
    raise EvalError(f"--units: the {ctx.method.name} model has no discrete units (no codebook; "
                    f"its predictions are {sorted(ctx.predict)})")
  units = ctx.predict["units"]
  try:
    return utterance_outputs(wavs, jax.jit(lambda w, m: units(w, m, layer)),
                             normalize=ctx.normalize)
  except ValueError as e:  # e.g. a layer without a codebook
    raise EvalError(f"--units: {e}") from None


def evaluate_units(ctx, wavs, rows, layer: int, k: int = 50, use_units: bool = False,
                   seed: int = 0, kmeans_iters: int = 50, standardize: bool = False,
                   fit_wavs=None, return_units: bool = False):
  """`score_units` of the k-means units (`kmeans_units`) or, with `use_units`, the model's own
  units (`predicted_units`) of the utterances `wavs` of `rows`. With `return_units`, also the
  per-utterance unit arrays."""
  if use_units:
    units = predicted_units(ctx, wavs, layer)
  else:
    units = kmeans_units(ctx, wavs, layer, k, seed, kmeans_iters, standardize, fit_wavs)
  out = score_units(units, rows)
  return (out, units) if return_units else out


def run(ctx, manifest: str = "", split: str = "", layer="last", k: int = 50, units: bool = False,
        seed: int = 0, standardize: bool = False, fit_split: str = "",
        kmeans_iters: int = 50) -> dict[str, float]:
  """The `units` task on the rows of `manifest` (default: the run's manifest) of `split`."""
  from jaxspeech.eval import common
  from jaxspeech.eval.registry import EvalError

  if fit_split and units:
    raise EvalError("--fit_split only applies to k-means units (not --units)")
  rows = common.task_rows(ctx, manifest, split, need_alignment=True)
  li = common.layer_index(ctx, layer)
  wavs = common.load_wavs(rows)
  fit_wavs = (common.load_wavs(common.task_rows(ctx, manifest, fit_split, False))
              if fit_split else None)
  return evaluate_units(ctx, wavs, rows, li, int(k), bool(units), int(seed), int(kmeans_iters),
                        bool(standardize), fit_wavs)
