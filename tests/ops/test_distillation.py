"""EMA update, DinoSR decay schedule, instance norm over valid frames."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech.ops.distillation import ema_decay_schedule, ema_update, instance_norm_over_time


def test_ema_update_values_and_fixed_point():
  rng = np.random.default_rng(0)
  student = {"a": rng.normal(size=(3, 4)).astype(np.float32),
             "b": [rng.normal(size=(5,)).astype(np.float32)]}
  teacher = jax.tree.map(lambda x: x + 1.0, student)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(t, s, d):
    return ema_update(t, s, d)

  out = step(teacher, student, 0.9)
  np.testing.assert_allclose(out["a"], 0.9 * teacher["a"] + 0.1 * student["a"], rtol=1e-6)
  # Fixed point: a teacher equal to the student stays equal, whatever the decay.
  same = step(student, student, 0.37)
  chex.assert_trees_all_close(same, student, rtol=1e-6)
  # decay=1 (frozen teacher) leaves it unchanged.
  chex.assert_trees_all_equal(step(teacher, student, 1.0), teacher)
  # Repeated updates converge to the student geometrically: t_n = s + (t_0 - s) * decay**n.
  t = teacher
  for _ in range(10):
    t = step(t, student, 0.5)
  want = student["a"].astype(np.float64) + 0.5**10
  np.testing.assert_allclose(t["a"], want, rtol=0, atol=4e-6)  # a few float32 ulps of |x|~3
  # Dtype of teacher leaves is kept.
  tb = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), teacher)
  assert ema_update(tb, student, 0.9)["a"].dtype == jnp.bfloat16


def test_schedule_endpoints():
  s = lambda step: float(ema_decay_schedule(step))  # DinoSR defaults
  np.testing.assert_allclose(s(0), 0.999, rtol=1e-7)
  np.testing.assert_allclose(s(15_000), (0.999 + 0.9999) / 2, rtol=1e-7)
  np.testing.assert_allclose(s(30_000), 0.9999, rtol=1e-7)
  np.testing.assert_allclose(s(100_000), 0.9999, rtol=1e-7)
  assert s(199_999) < 1.0 and s(200_000) == 1.0 and s(300_000) == 1.0
  assert float(ema_decay_schedule(10**6, freeze_step=None)) < 1.0
  steps = jnp.arange(0, 40_000, 1000)
  d = np.asarray(jax.jit(jax.vmap(ema_decay_schedule))(steps))
  assert np.all(np.diff(d) >= 0)


def test_instance_norm_valid_frames_only():
  rng = np.random.default_rng(1)
  x = (3.0 + 2.0 * rng.normal(size=(2, 3, 16, 5))).astype(np.float32)  # [Lyr, B, T, D]
  lengths = np.array([16, 9, 4])
  mask = np.arange(16)[None] < lengths[:, None]
  y = np.asarray(jax.jit(instance_norm_over_time)(x, mask))
  for b, n in enumerate(lengths):
    v = y[:, b, :n]
    np.testing.assert_allclose(v.mean(axis=1), 0.0, atol=1e-5)
    # Biased variance = 1 - eps/(var+eps) ~ 1.
    xv = x[:, b, :n].astype(np.float64)
    want_var = xv.var(axis=1) / (xv.var(axis=1) + 1e-5)
    np.testing.assert_allclose(v.var(axis=1), want_var, rtol=1e-4)
    np.testing.assert_array_equal(y[:, b, n:], 0.0)
  # Padding values are ignored.
  x2 = np.where(mask[None, :, :, None], x, 1e6).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(instance_norm_over_time(x2, mask)),
                                np.asarray(instance_norm_over_time(x, mask)))
  # Matches per-utterance standardisation computed with numpy.
  b = 1
  xv = x[0, b, :9].astype(np.float64)
  np.testing.assert_allclose(y[0, b, :9], (xv - xv.mean(0)) / np.sqrt(xv.var(0) + 1e-5),
                             rtol=1e-4, atol=1e-5)
