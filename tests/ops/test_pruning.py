"""Magnitude pruning: exact sparsity, ties, per-tensor vs global, regex selection, jit."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxspeech.ops.pruning import (
  _keep_from_scores,
  apply_masks,
  magnitude_mask,
  magnitude_masks,
  named_leaves,
  num_pruned,
  prunable_selection,
  sparsity_stats,
)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  return {
    "encoder": {
      "layers": [
        {"attention": {"q": {"kernel": f(32, 48), "bias": f(48)}},
         "ffn": {"kernel": 3.0 * f(48, 101)}},
        {"attention": {"q": {"kernel": f(32, 48), "bias": f(48)}},
         "ffn": {"kernel": 0.1 * f(48, 101)}},
      ],
    },
    "feature_extractor": {"conv": {"kernel": f(10, 1, 16)}},
  }


PATTERN = r"encoder/layers/\d+/.*kernel$"


def test_selection_by_regex_on_paths():
  names = [n for n, _ in named_leaves(_params())]
  assert "encoder/layers/0/attention/q/kernel" in names
  sel = dict(zip(names, jax.tree.leaves(prunable_selection(_params(), PATTERN))))
  assert sel["encoder/layers/1/ffn/kernel"] and sel["encoder/layers/0/attention/q/kernel"]
  assert not sel["encoder/layers/0/attention/q/bias"]
  assert not sel["feature_extractor/conv/kernel"]
  # NNX states: the trailing Variable 'value' key is dropped from the path.
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  names = [n for n, _ in named_leaves(nnx.state(model, nnx.Param))]
  assert sorted(names) == ["bias", "kernel"]


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.7, 0.9, 0.95, 1.0])
def test_per_tensor_exact_sparsity(s):
  params = _params()
  masks = jax.jit(magnitude_masks, static_argnums=(1, 2, 3))(params, s, PATTERN, "per_tensor")
  pruned = apply_masks(params, masks)
  stats = sparsity_stats(pruned, PATTERN)
  for name, x in named_leaves(params):
    if name in stats:
      n = np.size(x)
      want = round(n * s)
      assert int(np.sum(np.asarray(dict(named_leaves(pruned))[name]) == 0)) == want
      assert abs(float(stats[name]) - s) <= max(0.001, 0.5 / n)
      # The kept entries are exactly the largest-magnitude ones.
      a = np.abs(np.asarray(x)).ravel()
      kept = np.asarray(dict(named_leaves(masks))[name]).ravel()
      if 0 < want < n:
        assert a[kept].min() >= a[~kept].max()
  # Non-prunable tensors untouched.
  np.testing.assert_array_equal(pruned["feature_extractor"]["conv"]["kernel"],
                                params["feature_extractor"]["conv"]["kernel"])
  np.testing.assert_array_equal(pruned["encoder"]["layers"][0]["attention"]["q"]["bias"],
                                params["encoder"]["layers"][0]["attention"]["q"]["bias"])


def test_ties_exact_and_stable():
  x = jnp.ones((10, 10))
  m = np.asarray(magnitude_mask(x, 0.37))
  assert (~m).sum() == 37
  # Among equal magnitudes the lower flat index is pruned first.
  np.testing.assert_array_equal(~m.ravel(), np.arange(100) < 37)
  # Mixed: values with many ties straddling the threshold.
  y = jnp.asarray(np.array([3, 1, 2, 1, 1, 0, 2, 1], np.float32))
  my = np.asarray(magnitude_mask(y, 0.5))  # prune 4: the 0 then three of the four 1s
  np.testing.assert_array_equal(my, [True, False, True, False, False, False, True, True])
  # Negative values use magnitude.
  z = jnp.asarray([-5.0, 0.1, -0.2, 4.0])
  np.testing.assert_array_equal(np.asarray(magnitude_mask(z, 0.5)), [True, False, False, True])


def test_global_vs_per_tensor():
  params = _params(1)
  s = 0.6
  g = magnitude_masks(params, s, PATTERN, "global")
  stats = sparsity_stats(g, PATTERN)
  total = sum(np.size(x) for n, x in named_leaves(params) if n in stats)
  assert float(stats["global"]) * total == pytest.approx(round(total * s), abs=1e-3)
  # Global threshold: the ffn of layer 0 (scale 3) keeps more than the one of layer 1 (scale 0.1).
  s0, s1 = (float(stats[f"encoder/layers/{i}/ffn/kernel"]) for i in (0, 1))
  assert s0 < s < s1
  # Every kept entry is at least as large as every pruned one, across tensors.
  kept, pruned = [], []
  for (n, x), (_, m) in zip(named_leaves(params), named_leaves(g)):
    if n in stats:
      a, mm = np.abs(np.asarray(x)).ravel(), np.asarray(m).ravel()
      kept.append(a[mm])
      pruned.append(a[~mm])
  assert np.concatenate(kept).min() >= np.concatenate(pruned).max()
  # Per-tensor masks differ from the global ones but both hit the target overall.
  p = sparsity_stats(magnitude_masks(params, s, PATTERN, "per_tensor"), PATTERN)
  assert abs(float(p["global"]) - s) < 1e-3
  with pytest.raises(ValueError):
    magnitude_masks(params, s, PATTERN, "nope")


def test_jit_traced_sparsity_single_trace_and_apply():
  params = _params(2)

  @functools.partial(jax.jit, static_argnames=("scope",))
  @chex.assert_max_traces(n=2)  # one trace per scope, none per sparsity value
  def prune(p, s, scope):
    m = magnitude_masks(p, s, PATTERN, scope)
    return apply_masks(p, m), sparsity_stats(apply_masks(p, m), PATTERN)

  for s in (0.5, 0.7, 0.9):
    for scope in ("per_tensor", "global"):
      _, stats = prune(params, jnp.float32(s), scope=scope)
      assert abs(float(stats["global"]) - s) <= 1e-3
      if scope == "per_tensor":
        for name, v in stats.items():
          assert abs(float(v) - s) <= 1e-3, name
  assert int(num_pruned(5000, jnp.float32(0.7))) == num_pruned(5000, 0.7) == 3500
  # PARP re-prune: pruned weights that revived during "adjust" are pruned again by magnitude,
  # and an already pruned model is a fixed point of re-pruning at the same sparsity.
  pruned, _ = prune(params, jnp.float32(0.5), scope="per_tensor")
  again, _ = prune(pruned, jnp.float32(0.5), scope="per_tensor")
  chex.assert_trees_all_equal(again, pruned)


def _argsort_keep(scores, k):
  """Reference keep-mask (the former implementation): the first ``k`` of a stable ascending
  ``jnp.argsort`` are pruned. jnp, not numpy: XLA's float compare treats subnormals as zero on CPU
  (numpy orders them), and the selection must match the sort that XLA does."""
  order = jnp.argsort(jnp.asarray(scores), stable=True)  # [P]
  return np.asarray(jnp.zeros(order.shape, bool).at[order].set(jnp.arange(order.shape[0]) >= k))


def _score_cases():
  rng = np.random.default_rng(3)
  yield "normal", np.abs(rng.normal(size=1001)).astype(np.float32)
  yield "integer_ties", rng.integers(0, 7, size=777).astype(np.float32)
  yield "half_zeros", np.where(rng.random(513) < 0.5, 0.0, np.abs(rng.normal(size=513))).astype(
    np.float32)
  yield "all_zero", np.zeros(99, np.float32)
  yield "all_equal", np.full(64, 0.25, np.float32)
  yield "one", np.asarray([2.5], np.float32)
  yield "tiny_and_huge", np.asarray([0.0, 1e-45, 1e-38, 3e38, np.inf, 1e-45, 0.0, 1.0], np.float32)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_selection_mask_equals_argsort_reference(s):
  for name, scores in _score_cases():
    k = round(scores.size * s)
    got = np.asarray(_keep_from_scores(jnp.asarray(scores), s))
    np.testing.assert_array_equal(got, _argsort_keep(scores, k), err_msg=name)
    assert int((~got).sum()) == k, name


def test_selection_traced_sparsity_one_trace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def keep(scores, s):
    return _keep_from_scores(scores, s)

  for name, scores in _score_cases():
    if scores.size != 777:  # one shape: one trace
      continue
    for s in (0.0, 0.3, 0.5, 0.9, 1.0):
      k = int(num_pruned(scores.size, jnp.float32(s)))
      np.testing.assert_array_equal(np.asarray(keep(jnp.asarray(scores), jnp.float32(s))),
                                    _argsort_keep(scores, k), err_msg=f"{name} {s}")


def test_selection_orders_negative_zero_and_nan_like_argsort():
  # Magnitudes are >= 0, but any float32 gets the argsort mask: -0.0 ties with 0.0, NaNs (of
  # either sign) tie with each other after +inf, negative values come first.
  x = np.asarray([0.0, -0.0, np.nan, -1.0, np.inf, -np.nan, 0.0, -np.inf, 2.0, -0.0], np.float32)
  for k in range(x.size + 1):
    got = np.asarray(_keep_from_scores(jnp.asarray(x), k / x.size))
    np.testing.assert_array_equal(got, _argsort_keep(x, k), err_msg=str(k))
