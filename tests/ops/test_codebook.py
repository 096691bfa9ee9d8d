"""DinoSR EMA codebooks and nearest-codeword assignment vs numpy."""

import chex
import jax
import numpy as np

from jaxspeech.ops.codebook import (
  CodebookState,
  codebook_embeddings,
  codebook_update,
  codebook_usage,
  init_codebook,
  init_codebook_normal,
  nearest_codeword,
  restart_dead_codewords,
)


def _np_nearest(x, e):
  d = ((x[..., None, :].astype(np.float64) - e.astype(np.float64)) ** 2).sum(-1)
  return d.argmin(-1), d.min(-1)


def test_nearest_codeword_matches_numpy_and_chunking():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 37, 8)).astype(np.float32)
  e = rng.normal(size=(20, 8)).astype(np.float32)
  want_ids, want_d = _np_nearest(x, e)
  ids, d = jax.jit(nearest_codeword, static_argnums=2)(x, e, None)
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  np.testing.assert_allclose(np.asarray(d), want_d, rtol=1e-4, atol=1e-5)
  ids_c, d_c = jax.jit(nearest_codeword, static_argnums=2)(x, e, 16)  # 111 = 6*16 + 15
  np.testing.assert_array_equal(np.asarray(ids_c), want_ids)
  np.testing.assert_allclose(np.asarray(d_c), np.asarray(d), rtol=1e-6)


def _np_update(sums, counts, y, codes, mask, tau):
  v = counts.shape[0]
  o = np.eye(v)[codes[mask]]
  cnt, mem = o.sum(0), o.T @ y[mask].astype(np.float64)
  alpha = np.where(cnt > 0, tau, 1.0)
  return alpha[:, None] * sums + (1 - alpha[:, None]) * mem, alpha * counts + (1 - alpha) * cnt


def test_codebook_update_matches_numpy_and_unused_unchanged():
  rng = np.random.default_rng(1)
  v, d = 12, 6
  state = init_codebook(jax.random.key(0), v, d)
  sums0, counts0 = np.asarray(state.sums), np.asarray(state.counts)
  # Init: counts 1, sums instance-normalised over codewords.
  np.testing.assert_array_equal(counts0, 1.0)
  np.testing.assert_allclose(sums0.mean(0), 0.0, atol=1e-5)
  y = rng.normal(size=(2, 15, d)).astype(np.float32)
  mask = np.arange(15)[None] < np.array([15, 8])[:, None]
  codes = rng.integers(0, v - 4, size=(2, 15))  # codewords v-4..v-1 never used
  codes[1, 8:] = v - 1  # padded frames point at an unused codeword: must be ignored

  @jax.jit
  @chex.assert_max_traces(n=1)
  def upd(s, y, c, m):
    return codebook_update(s, y, c, m, 0.9)

  new = upd(state, y, codes, mask)
  want_s, want_n = _np_update(sums0, counts0, y, codes, mask, 0.9)
  np.testing.assert_allclose(np.asarray(new.sums), want_s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.counts), want_n, rtol=1e-6)
  used = np.zeros(v, bool)
  used[np.unique(codes[mask])] = True
  np.testing.assert_array_equal(np.asarray(new.sums)[~used], sums0[~used])
  np.testing.assert_array_equal(np.asarray(new.counts)[~used], counts0[~used])
  np.testing.assert_allclose(np.asarray(codebook_embeddings(new)), want_s / want_n[:, None],
                             rtol=1e-5, atol=1e-6)


def test_codebook_converges_to_cluster_means_and_usage():
  # Repeated updates with the same data: E_v -> mean of the frames assigned to v.
  rng = np.random.default_rng(2)
  y = rng.normal(size=(1, 50, 3)).astype(np.float32)
  mask = np.ones((1, 50), bool)
  codes = np.repeat(np.arange(5), 10)[None]
  state = CodebookState(np.zeros((6, 3), np.float32), np.ones((6,), np.float32))
  for _ in range(200):
    state = codebook_update(state, y, codes, mask, 0.9)
  e = np.asarray(codebook_embeddings(state))
  for k in range(5):
    np.testing.assert_allclose(e[k], y[0, codes[0] == k].mean(0), rtol=1e-4, atol=1e-5)
  u = codebook_usage(codes, mask, 6)
  np.testing.assert_allclose(float(u["perplexity"]), 5.0, rtol=1e-5)
  np.testing.assert_allclose(float(u["used_fraction"]), 5 / 6, rtol=1e-6)


def test_stacked_codebooks_vmap():
  rng = np.random.default_rng(3)
  keys = jax.random.split(jax.random.key(0), 4)
  states = jax.vmap(lambda k: init_codebook(k, 8, 5))(keys)  # [Lyr, V, D]
  y = rng.normal(size=(4, 2, 10, 5)).astype(np.float32)  # [Lyr, B, T, D]
  mask = np.ones((2, 10), bool)
  codes, _ = jax.vmap(nearest_codeword)(y, jax.vmap(codebook_embeddings)(states))
  new = jax.vmap(codebook_update, in_axes=(0, 0, 0, None))(states, y, codes, mask)
  for i in range(4):
    s_i = CodebookState(states.sums[i], states.counts[i])
    one = codebook_update(s_i, y[i], codes[i], mask)
    np.testing.assert_allclose(np.asarray(new.sums[i]), np.asarray(one.sums), rtol=1e-6)


def test_init_codebook_normal_scale():
  state = init_codebook_normal(jax.random.key(0), 256, 64)
  assert state.sums.shape == (256, 64) and state.counts.shape == (256,)
  np.testing.assert_allclose(float(np.std(np.asarray(state.sums))), 256**-0.5, rtol=0.02)
  np.testing.assert_array_equal(np.asarray(state.counts), np.ones(256, np.float32))


def test_restart_dead_codewords_idle_counting_and_reset_to_selected_frames():
  v, d = 6, 3
  rng = np.random.default_rng(0)
  state = CodebookState(rng.normal(size=(v, d)).astype(np.float32),
                        rng.uniform(1, 2, size=v).astype(np.float32))
  y = rng.normal(size=(2, 5, d)).astype(np.float32)
  codes = np.array([[0, 0, 1, 5, 5], [1, 2, 2, 2, 4]], np.int32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)  # used: 0, 1, 2 (4, 5 unselected)
  idle = np.array([7, 9, 0, 1, 2, 0], np.int32)
  fn = jax.jit(restart_dead_codewords, static_argnums=6)
  new, new_idle = fn(state, idle, y, codes, mask, jax.random.key(1), 3)
  # Used codewords reset to 0 idle steps, unused ones count up; 2 + 1 = 3 >= patience: restarted.
  np.testing.assert_array_equal(np.asarray(new_idle), [0, 0, 0, 2, 0, 1])
  selected = y[mask]  # [N, D]
  for c in range(v):
    if c == 4:
      assert float(new.counts[c]) == 1.0
      dist = np.abs(selected - np.asarray(new.sums[c])).sum(-1)
      assert dist.min() == 0.0  # exactly one of the selected frames
    else:
      np.testing.assert_array_equal(np.asarray(new.sums[c]), state.sums[c])
      assert float(new.counts[c]) == float(state.counts[c])
  # Many draws: restarted codewords only ever take selected frames.
  for seed in range(20):
    new, _ = fn(state, np.full(v, 5, np.int32), y, codes, mask, jax.random.key(seed), 3)
    for c in (3, 4, 5):
      assert np.abs(selected - np.asarray(new.sums[c])).sum(-1).min() == 0.0
  # No selected frame: nothing restarts, idle counters still advance.
  new, new_idle = fn(state, idle, y, codes, np.zeros_like(mask), jax.random.key(2), 3)
  np.testing.assert_array_equal(np.asarray(new.sums), state.sums)
  np.testing.assert_array_equal(np.asarray(new_idle), idle + 1)
