"""ABX: jit DTW vs numpy DTW, known answers on synthetic items."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.eval.abx import abx_error, dtw, frame_distances, pad_items, phone_segments


def np_dtw(d):
  """Reference DTW (steps diag/up/left, diag preferred on ties), cost / best-path length."""
  n, m = d.shape
  c = np.full((n, m), np.inf)
  length = np.zeros((n, m))
  for i, j in itertools.product(range(n), range(m)):
    if i == 0 and j == 0:
      c[i, j], length[i, j] = d[0, 0], 1
      continue
    cands = []
    if i > 0 and j > 0:
      cands.append((c[i - 1, j - 1], length[i - 1, j - 1]))
    if i > 0:
      cands.append((c[i - 1, j], length[i - 1, j]))
    if j > 0:
      cands.append((c[i, j - 1], length[i, j - 1]))
    best = min(range(len(cands)), key=lambda k: cands[k][0])
    c[i, j], length[i, j] = d[i, j] + cands[best][0], cands[best][1] + 1
  return c[-1, -1] / length[-1, -1]


@pytest.mark.parametrize("metric", ["cosine", "angular"])
def test_dtw_matches_numpy(metric):
  rng = np.random.default_rng(0)
  items = [rng.normal(size=(n, 5)).astype(np.float32) for n in (1, 3, 7, 9, 4)]
  padded, lengths = pad_items(items)
  f = jax.jit(lambda a, na, b, nb: dtw(frame_distances(a, b, metric), na, nb))
  for i, j in itertools.product(range(len(items)), repeat=2):
    got = float(f(padded[i], lengths[i], padded[j], lengths[j]))
    a, b = items[i].astype(np.float64), items[j].astype(np.float64)
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1,
                                                                                keepdims=True)).T
    cos = np.clip(cos, -1, 1)
    d = 1 - cos if metric == "cosine" else np.arccos(cos) / np.pi
    assert got == pytest.approx(np_dtw(d), rel=1e-4, abs=1e-6), (i, j)
  # A sequence and a time-stretched copy of itself are at distance 0.
  stretched = np.repeat(items[2], 2, axis=0)
  p2, l2 = pad_items([items[2], stretched])
  assert float(f(p2[0], l2[0], p2[1], l2[1])) == pytest.approx(0.0, abs=1e-5)
  assert float(dtw(jnp.zeros((4, 4)), 2, 3)) == 0.0


def _synthetic(rng, swap_second_speaker=False, n_per=4, dim=16, noise=0.05):
  # Prototypes 0 and 1 are 45 degrees apart, 2 is at 90 degrees from both; frame noise ~4 degrees.
  eye = np.eye(dim)
  protos = 3.0 * np.stack([eye[0], (eye[0] + eye[1]) / np.sqrt(2), eye[2]])
  feats, labels, ctxs, spks = [], [], [], []
  for spk, ctx, lab in itertools.product(range(2), range(2), range(3)):
    proto_idx = lab
    if swap_second_speaker and spk == 1 and lab < 2:
      proto_idx = 1 - lab  # speaker 1 says "0" the way speaker 0 says "1" and vice versa
    for _ in range(n_per):
      length = rng.integers(3, 9)
      feats.append((protos[proto_idx] + noise * rng.normal(size=(length, dim))).astype(np.float32))
      labels.append(lab)
      ctxs.append(("x", ctx))
      spks.append(spk)
  return feats, labels, ctxs, spks


def test_known_answers():
  rng = np.random.default_rng(1)
  feats, labels, ctxs, spks = _synthetic(rng)
  res = abx_error(feats, labels, ctxs, spks)
  assert res["abx_within"] == 0.0 and res["abx_across"] == 0.0
  # Cells: 2 speakers x 2 contexts x 6 ordered pairs within; x 2 ordered speaker pairs across.
  assert res["num_within_cells"] == 24 and res["num_across_cells"] == 24
  # Identical representations: every distance ties, error exactly 50%.
  same = [np.ones_like(f) for f in feats]
  res = abx_error(same, labels, ctxs, spks, metric="angular")
  assert res["abx_within"] == 50.0 and res["abx_across"] == 50.0
  # Speaker-dependent code: within perfect; across, the swapped pairs (0,1), (1,0) are always
  # wrong. Pairs (2,0), (2,1): X looks like A. Pairs (0,2), (1,2): X looks like the other of 0/1,
  # which is closer to A (45 degrees) than to B (90 degrees): right. -> 2/6 errors.
  feats, labels, ctxs, spks = _synthetic(rng, swap_second_speaker=True)
  res = abx_error(feats, labels, ctxs, spks)
  assert res["abx_within"] == 0.0
  assert res["abx_across"] == pytest.approx(100.0 * 2 / 6)
  # Subsampling cells keeps the known answers and shrinks the counts of triplets, not of cells.
  res = abx_error(feats, labels, ctxs, spks, max_items_per_cell=2)
  assert res["abx_within"] == 0.0 and res["abx_across"] == pytest.approx(100.0 * 2 / 6)
  assert res["num_within_cells"] == 24
  # Pure noise: near chance.
  noise = [rng.normal(size=f.shape).astype(np.float32) for f in feats]
  res = abx_error(noise, labels, ctxs, spks)
  assert 35.0 < res["abx_within"] < 65.0 and 35.0 < res["abx_across"] < 65.0


def test_phone_segments():
  segs = phone_segments(["sil", "sil", "a", "a", "a", "b", "c", "c", "sil"])
  assert segs == [(2, 5, "a", ("sil", "b")), (5, 6, "b", ("a", "c")), (6, 8, "c", ("b", "sil"))]
  assert phone_segments(["a", "a"]) == []
