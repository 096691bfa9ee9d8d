"""Sinkhorn-Knopp: numpy reference parity, marginals, padding, dtypes, 1 vs 8 devices."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.ops.sinkhorn import sinkhorn, sinkhorn_log


def np_sinkhorn(out: np.ndarray, epsilon: float, iters: int) -> np.ndarray:
  """The reference algorithm (Spin ``compute_sinkhorn``) on flat valid frames, in float64."""
  out = out.astype(np.float64)
  n, k = out.shape
  q = np.exp(out / epsilon).T  # [K, N]
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True) * k
    q /= q.sum(axis=0, keepdims=True) * n
  q *= n
  return q.T


def _padded_case(seed=0, b=4, t=12, k=16, scale=1.0):
  rng = np.random.default_rng(seed)
  logits = rng.uniform(-scale, scale, size=(b, t, k)).astype(np.float32)
  lengths = rng.integers(3, t + 1, size=b)
  lengths[0] = t
  mask = np.arange(t)[None, :] < lengths[:, None]
  return logits, mask


@pytest.mark.parametrize("epsilon,iters", [(0.02, 3), (0.05, 3), (0.1, 10)])
def test_matches_numpy_reference_on_valid_frames(epsilon, iters):
  logits, mask = _padded_case()
  got = np.asarray(jax.jit(sinkhorn, static_argnums=(2, 3))(logits, mask, epsilon, iters))
  want = np_sinkhorn(logits[mask], epsilon, iters)
  np.testing.assert_allclose(got[mask], want, rtol=2e-4, atol=1e-6)
  # Padded frames carry no mass at all.
  assert np.all(got[~mask] == 0.0)


def test_marginals():
  logits, mask = _padded_case(seed=1, b=3, t=40, k=8)
  n = mask.sum()
  t = np.asarray(sinkhorn(logits, mask, 0.05, 50))
  # Rows (frames) sum to 1 exactly after the last frame normalisation.
  np.testing.assert_allclose(t[mask].sum(-1), 1.0, rtol=1e-5)
  # Codeword marginals converge to the uniform N/K with enough iterations.
  np.testing.assert_allclose(t[mask].sum(0), n / 8, rtol=1e-3)
  # With Spin's 3 iterations the marginals are those of the reference, not yet uniform.
  t3 = np.asarray(sinkhorn(logits, mask, 0.02, 3))
  np.testing.assert_allclose(t3[mask].sum(0), np_sinkhorn(logits[mask], 0.02, 3).sum(0), rtol=1e-4)


def test_padding_values_do_not_matter():
  logits, mask = _padded_case(seed=2)
  other = np.where(mask[..., None], logits, 1e4).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(sinkhorn(logits, mask)),
                                np.asarray(sinkhorn(other, mask)))


def test_no_overflow_float32_and_bfloat16():
  # Logits of magnitude 5 at eps=0.02: exp(250) overflows float32 (max ~exp(88.7)).
  logits, mask = _padded_case(seed=3, scale=5.0)
  want = np_sinkhorn(logits[mask], 0.02, 3)
  t32 = np.asarray(sinkhorn(jnp.asarray(logits), mask, 0.02, 3))
  assert np.all(np.isfinite(t32))
  np.testing.assert_allclose(t32[mask], want, rtol=1e-3, atol=1e-6)
  lb = jnp.asarray(logits, dtype=jnp.bfloat16)
  tb = np.asarray(sinkhorn(lb, mask, 0.02, 3))
  assert tb.dtype == np.float32 and np.all(np.isfinite(tb))
  # bfloat16 only rounds the inputs; the algorithm itself runs in float32.
  want_b = np_sinkhorn(np.asarray(lb.astype(jnp.float32))[mask], 0.02, 3)
  np.testing.assert_allclose(tb[mask], want_b, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(tb[mask].sum(-1), 1.0, rtol=1e-5)


def test_log_targets_and_no_gradient_and_single_trace():
  logits, mask = _padded_case(seed=4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(x, m):
    return sinkhorn_log(x, m)

  lt = f(logits, mask)
  f(logits + 1.0, ~(~mask))  # same shapes/dtypes -> no retrace
  # exp(log T) is the reference T; float32 log-domain values reach |log T| ~ 100, so ~1e-5
  # relative error is the format's own limit.
  np.testing.assert_allclose(np.exp(np.asarray(lt, np.float64))[mask],
                             np_sinkhorn(logits[mask], 0.02, 3), rtol=2e-4, atol=1e-7)
  assert np.all(np.isneginf(np.asarray(lt)[~mask]))
  def obj(x):
    t = sinkhorn(x, mask)
    return jnp.sum(t * x), t

  g, t = jax.grad(obj, has_aux=True)(jnp.asarray(logits))
  # d/dx of sum(stop_gradient(T) * x) is T itself: no gradient flows through the targets.
  np.testing.assert_array_equal(np.asarray(g), np.asarray(t))


_SHARDED_SCRIPT = textwrap.dedent(
  """
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxspeech.ops.sinkhorn import sinkhorn
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  logits = rng.uniform(-1, 1, size=(16, 20, 32)).astype(np.float32)
  mask = np.arange(20)[None] < rng.integers(2, 21, size=16)[:, None]
  single = np.asarray(jax.jit(sinkhorn)(jax.device_put(logits, jax.devices()[0]),
                                        jax.device_put(mask, jax.devices()[0])))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(logits, NamedSharding(mesh, P("data")))
  ms = jax.device_put(mask, NamedSharding(mesh, P("data")))
  out = jax.jit(sinkhorn)(xs, ms)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-7)
  # A per-shard (local) Sinkhorn would differ: check the test can tell them apart.
  local = np.concatenate([np.asarray(sinkhorn(logits[i:i + 2], mask[i:i + 2]))
                          for i in range(0, 16, 2)])
  assert np.abs(local - single).max() > 1e-3
  print("OK")
  """
)


def test_sharded_equals_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
