"""ABX against libri-light's algorithm (eval_ABX.py, dtw.pyx): DTW tie-break and path-length
normalisation, angular frame distance, averaging order; known answers on synthetic items."""

import itertools
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.eval.abx import abx_error, dtw, frame_distances, pad_items, phone_segments


def np_dtw(d):
  """libri-light's ``_dtw(normalized=True)``: accumulated cost / length of the path backtracked from
  the last cell, preferring the diagonal, then (i, j-1), then (i-1, j)."""
  n, m = d.shape
  c = np.zeros((n, m))
  for i, j in itertools.product(range(n), range(m)):
    prev = [c[i - 1, j - 1] if i and j else np.inf, c[i, j - 1] if j else np.inf,
            c[i - 1, j] if i else np.inf]
    c[i, j] = d[i, j] + (min(prev) if i or j else 0.0)
  i, j, length = n - 1, m - 1, 1
  while i > 0 and j > 0:
    k = int(np.argmin([c[i - 1, j - 1], c[i, j - 1], c[i - 1, j]]))  # first minimum
    i, j = (i - 1, j - 1) if k == 0 else (i, j - 1) if k == 1 else (i - 1, j)
    length += 1
  return c[-1, -1] / (length + i + j)


def np_angular(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1,
                                                                              keepdims=True)).T
  return np.arccos(np.clip(cos, -1, 1)) / np.pi


def test_dtw_tie_break_prefers_left_step():
  # Costs: [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], total 1. From (2, 3) the steps to (2, 2)
  # and to (1, 3) tie (cost 0). libri-light takes (2, 2) -> (1, 1) -> (0, 0): 4 cells, 1/4.
  # Preferring (i-1, j) would give (1, 3) -> (0, 2) -> (0, 1) -> (0, 0): 5 cells, 1/5.
  d = np.array([[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
  assert np_dtw(d) == 0.25 and np_dtw(d.T) == 0.2
  assert float(dtw(jnp.asarray(d), 3, 4)) == 0.25
  assert dtw(jnp.asarray(d.T), 4, 3) == np.float32(0.2)
  np.testing.assert_array_equal(np.asarray(dtw(jnp.asarray(d), 3, 4, both=True)),
                                np.float32([0.25, 0.2]))
  # Padding beyond the lengths is ignored.
  padded = np.full((5, 6), 7.0, np.float32)
  padded[:3, :4] = d
  assert float(dtw(jnp.asarray(padded), 3, 4)) == 0.25


@pytest.mark.parametrize("kind", ["continuous", "units"])
def test_dtw_matches_numpy(kind):
  rng = np.random.default_rng(0)
  if kind == "continuous":
    items = [rng.normal(size=(n, 5)).astype(np.float32) for n in (1, 3, 7, 9, 4)]
  else:  # discrete units: distances 0, 1/2 or 1 exactly, many tied paths
    code = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
    items = [code[rng.integers(0, 4, n)] for n in rng.integers(2, 9, 12)]
  padded, lengths = pad_items(items)
  distances = jax.jit(frame_distances)
  f = jax.jit(lambda d, na, nb: dtw(d, na, nb, both=True))
  n_differ = 0
  for i, j in itertools.product(range(len(items)), repeat=2):
    d = distances(padded[i], padded[j])  # [L, L], padded
    got = np.asarray(f(d, lengths[i], lengths[j]))
    d = np.asarray(d, np.float64)[:lengths[i], :lengths[j]]
    np.testing.assert_allclose(got, [np_dtw(d), np_dtw(d.T)], rtol=1e-6, err_msg=str((i, j)))
    n_differ += got[0] != got[1]
  if kind == "units":
    assert n_differ > 0  # the case exercises the tie-break
  assert float(dtw(jnp.zeros((4, 4)), 2, 3)) == 0.0


def test_frame_distances():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
  got = np.asarray(frame_distances(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got, np_angular(a, b), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(frame_distances(a, b, "cosine")), got)  # libri-light
  one_minus = np.asarray(frame_distances(a, b, "one_minus_cos"))
  np.testing.assert_allclose(one_minus, 1 - np.cos(np.pi * np_angular(a, b)), rtol=0, atol=1e-6)
  # Exact values on unit-norm axes: same direction 0, orthogonal 1/2, opposite 1.
  axes = np.array([[2, 0], [0, 3], [-1, 0]], np.float32)
  np.testing.assert_array_equal(np.asarray(frame_distances(axes[:1], axes)), [[0.0, 0.5, 1.0]])
  # All-zero frames (libri-light's normalize_with_singularity): 0 to each other, 1 to the rest.
  z = np.array([[0, 0], [0, 2]], np.float32)
  np.testing.assert_array_equal(np.asarray(frame_distances(z, z)), [[0.0, 1.0], [1.0, 0.0]])
  with pytest.raises(ValueError, match="metric"):
    frame_distances(a, b, "euclidean")


def test_time_stretched_copy_at_distance_zero():
  rng = np.random.default_rng(4)
  code = np.eye(6, dtype=np.float32)  # exact unit vectors: equal frames at angular distance 0
  x = code[rng.integers(0, 6, 7)]
  for metric, item in (("angular", x), ("one_minus_cos", rng.normal(size=(7, 5)))):
    p, n = pad_items([item, np.repeat(item, 2, axis=0)])
    d = dtw(frame_distances(jnp.asarray(p[0]), jnp.asarray(p[1]), metric), n[0], n[1])
    assert float(d) == pytest.approx(0.0, abs=1e-6)


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


# Single-frame items on axes: a0 = [1, 0], a180 = [-1, 0] (category "a"), b = [0, 1] (category
# "b"). Angular distances: d(a0, a0) = 0, d(a0, b) = 1/2, d(a0, a180) = 1, d(b, b) = 0.
_A0, _A180, _B = [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]


def _items(spec):
  """``{(context, speaker): [a frames...]}`` -> items, each cell also holding one "b" at 90 deg."""
  feats, labels, ctxs, spks = [], [], [], []
  for (c, s), a_frames in spec.items():
    for frame, lab in [(f, "a") for f in a_frames] + [(_B, "b")]:
      feats.append(np.array([frame], np.float32))
      labels.append(lab)
      ctxs.append(c)
      spks.append(s)
  return feats, labels, ctxs, spks


def test_within_averages_contexts_then_speakers_then_pairs():
  # Within cells (a, b) (one "b" per cell: no (b, a) cell): X and A of "a" differ in angle -> error.
  #   (c1, s1) a0 a0: 0;  (c2, s1) a0 a0: 0;  (c1, s2) a0 a180: 1.
  # libri-light: s1 = mean(0, 0) = 0, s2 = 1 -> pair (a, b) = 1/2 -> 50%.
  # Every cell equally: mean(0, 0, 1) = 1/3 -> 33.3%.
  items = _items({("c1", "s1"): [_A0, _A0], ("c2", "s1"): [_A0, _A0], ("c1", "s2"): [_A0, _A180]})
  res = abx_error(*items)
  assert res["abx_within"] == pytest.approx(50.0)
  assert res["num_within_cells"] == 3
  assert abx_error(*items, averaging="pair_cells")["abx_within"] == pytest.approx(100.0 / 3)


def test_across_averages_contexts_and_x_speakers_then_speakers_then_pairs():
  # Across (a, b), cell (context, speaker of A and B, speaker of X): error = share of (A, X) that
  # differ in angle (d(B, X) = 1/2 always); (b, a) cells: A and X are both "b" -> 0.
  #   c1: s1 a0 a0, s2 a0 a0, s3 a180 a180;  c2: s1 a0 a0, s2 a180 a180.
  #   (a, b): c1 (s1,s2) 0, (s1,s3) 1, (s2,s1) 0, (s2,s3) 1, (s3,s1) 1, (s3,s2) 1; c2 (s1,s2) 1,
  #   (s2,s1) 1.
  # libri-light: s1 = mean(0, 1, 1) = 2/3, s2 = 2/3, s3 = 1 -> (a, b) = 7/9; (b, a) = 0
  #   -> 7/18 = 38.9%. Every cell equally: (a, b) = 6/8 -> 3/8 = 37.5%.
  items = _items({("c1", "s1"): [_A0, _A0], ("c1", "s2"): [_A0, _A0],
                  ("c1", "s3"): [_A180, _A180], ("c2", "s1"): [_A0, _A0],
                  ("c2", "s2"): [_A180, _A180]})
  res = abx_error(*items)
  assert res["abx_across"] == pytest.approx(100.0 * 7 / 18)
  assert res["num_across_cells"] == 16  # 8 (a, b) + 8 (b, a)
  assert res["abx_within"] == 0.0
  assert abx_error(*items, averaging="pair_cells")["abx_across"] == pytest.approx(37.5)
  with pytest.raises(ValueError, match="averaging"):
    abx_error(*items, averaging="cells")


def _libri_light_abx(features, labels, contexts, speakers):
  """libri-light's eval_ABX.py on every item (no subsampling), triplet by triplet with ``np_dtw``:
  DTW rows are X's frames (within a group, d(A, X) from the earlier item's frames); the error of
  a group is averaged over contexts (and X speakers), then speakers, then phone pairs."""
  dist = lambda x, y: np_dtw(np_angular(features[x], features[y]))
  groups = defaultdict(list)
  for k, key in enumerate(zip(contexts, speakers, labels)):
    groups[key].append(k)
  scores = {}
  for mode in ("within", "across"):
    board = defaultdict(list)  # (speaker, a, b) -> group errors over contexts (and X speakers)
    for (c, s, a), ia in groups.items():
      for (c_b, s_b, b), ib in groups.items():
        if c_b != c or s_b != s or b == a:
          continue
        if mode == "within":
          if len(ia) < 2:
            continue
          x_sets = [ia]
        else:
          x_sets = [ix for (c_x, s_x, a_x), ix in groups.items()
                    if c_x == c and a_x == a and s_x != s]
        for ix in x_sets:
          wrong = total = 0.0
          for xi, x in enumerate(ix):
            for ai, aa in enumerate(ia):
              if mode == "within" and ai == xi:
                continue
              d_ax = dist(x, aa) if mode == "across" or xi <= ai else dist(aa, x)
              for bb in ib:
                d_bx = dist(x, bb)
                wrong += (d_ax > d_bx) + 0.5 * (d_ax == d_bx)
                total += 1
          board[(s, a, b)].append(wrong / total)
    pairs = defaultdict(list)
    for (_, a, b), errs in board.items():
      pairs[(a, b)].append(np.mean(errs))
    scores[mode] = 100.0 * np.mean([np.mean(v) for v in pairs.values()])
  return scores


def test_matches_libri_light_on_discrete_units():
  # Unit sequences (codewords on axes, so distances are exactly 0, 1/2 or 1): ties in DTW paths
  # and in triplets, unbalanced cells.
  rng = np.random.default_rng(7)
  code = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)
  feats, labels, ctxs, spks = [], [], [], []
  for c, s, y in itertools.product(range(2), range(3), range(3)):
    for _ in range(rng.integers(0, 4)):
      feats.append(code[(rng.integers(0, 2, rng.integers(1, 5)) + y + s) % 4])
      labels.append(y)
      ctxs.append(c)
      spks.append(s)
  res = abx_error(feats, labels, ctxs, spks)
  want = _libri_light_abx(feats, labels, ctxs, spks)
  assert res["abx_within"] == pytest.approx(want["within"], rel=1e-9)
  assert res["abx_across"] == pytest.approx(want["across"], rel=1e-9)


# Unit sequences on the axes u = [1, 0], v = [0, 1], -u, for which the DTW orientation matters:
# rows P = (u, -u, u), columns Q = (u, v, u, -u): cost 3/2, and from the last cell the (i, j-1)
# and (i-1, j) steps tie; libri-light's path has 4 cells (3/8), the other 5 (3/10) = d(Q rows, P).
_CODE = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
_P, _Q = _CODE[[0, 2, 0]], _CODE[[0, 1, 0, 2]]
_B_ACROSS, _B_WITHIN = _CODE[[0, 0]], _CODE[[1, 2, 2, 0]]


def test_dtw_rows_are_the_x_frames():
  dist = lambda x, y: np_dtw(np_angular(x, y))
  assert (dist(_P, _Q), dist(_Q, _P)) == (3 / 8, 3 / 10)
  assert dist(_P, _B_ACROSS) == dist(_B_ACROSS, _P) == 1 / 3
  assert dist(_Q, _B_WITHIN) == dist(_B_WITHIN, _Q) == 1 / 3
  assert dist(_P, _B_WITHIN) == dist(_B_WITHIN, _P) == 1 / 8
  # Across: A = Q, B = B_ACROSS (speaker 1), X = P (speaker 2, last item). With X's frames as the
  # rows d(A, X) = 3/8 > d(B, X) = 1/3: an error; with A's it would be 3/10, no error.
  res = abx_error([_Q, _B_ACROSS, _P], ["a", "b", "a"], ["c"] * 3, [1, 1, 2])
  assert res["abx_across"] == 100.0 and res["num_across_cells"] == 1
  # Within, the two "a" items of a cell share one d(A, X), from the earlier item's frames (as
  # libri-light's symmetric group distance). Context c1, items P then Q: d(A, X) = 3/8 for both
  # triplets, d(B, X) = 1/3 (X = Q) or 1/8 (X = P): 2 errors. Context c2, Q then P: d(A, X) = 3/10,
  # 1 error. Mean over the contexts: (1 + 1/2) / 2 = 75%. (X's rows always: 50%; A's: 100%.)
  items = [_P, _Q, _B_WITHIN, _Q, _P, _B_WITHIN]
  res = abx_error(items, list("aabaab"), ["c1"] * 3 + ["c2"] * 3, [1] * 6)
  assert res["abx_within"] == 75.0


def _random_items(seed=0, n=200):
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(int(rng.integers(2, 6)), 4)).astype(np.float32) for _ in range(n)]
  labels = rng.integers(0, 3, n).tolist()
  ctxs = rng.integers(0, 2, n).tolist()
  spks = rng.integers(0, 4, n).tolist()
  return feats, labels, ctxs, spks


def test_zerospeech_subsampling_caps(monkeypatch):
  import jaxspeech.eval.abx as abx

  items = _random_items()
  full = abx_error(*items)
  # Caps above every cell's size change nothing.
  big = abx_error(*items, max_size_group=1000, max_x_across=1000)
  assert big == full
  # Every scored cell has at most max_size_group A, B and X items.
  shapes = []
  real = abx._triplet_error
  monkeypatch.setattr(abx, "_triplet_error",
                      lambda d_ax, d_bx, same: shapes.append((d_ax.shape, d_bx.shape)) or
                      real(d_ax, d_bx, same))
  capped = abx_error(*items, max_size_group=3, seed=1)
  assert shapes and max(max(a + b) for a, b in shapes) == 3
  assert capped["num_across_cells"] == full["num_across_cells"]
  assert capped["abx_within"] != full["abx_within"]
  # Within a speaker A and X are one draw: a single item leaves no X != A.
  assert abx_error(*items, max_size_group=1)["num_within_cells"] == 0
  # Across: at most max_x_across X speakers per (context, speaker, a, b).
  one_x = abx_error(*items, max_x_across=1)
  keys = list(zip(items[2], items[3], items[1]))  # (context, speaker, label)
  groups = {(c, s, a, b) for c, s, a in keys for b in set(items[1])
            if b != a and (c, s, b) in keys and any(k[0] == c and k[1] != s and k[2] == a
                                                     for k in keys)}
  assert one_x["num_across_cells"] == len(groups) < full["num_across_cells"]
  assert one_x["abx_within"] == full["abx_within"]
  # Reproducible by seed; another seed draws other items.
  assert abx_error(*items, max_size_group=3, seed=1) == capped
  assert abx_error(*items, max_size_group=3, seed=2)["abx_within"] != capped["abx_within"]
  with pytest.raises(ValueError, match="max_size_group"):
    abx_error(*items, max_size_group=0)
