"""Batch-sharded (8 fake CPU devices) == single device for the ops whose statistics are global
sums over the batch: Spin loss (Sinkhorn inside), DinoSR codebook update, k-means step."""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
  """
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxspeech.ops.codebook import codebook_update, init_codebook, nearest_codeword
  from jaxspeech.ops.codebook import codebook_embeddings
  from jaxspeech.ops.kmeans import kmeans_step
  from jaxspeech.ops.swapped_prediction import normalize_codebook, spin_loss
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  b, t, d, k = 16, 24, 8, 12
  z1 = rng.normal(size=(b, t, d)).astype(np.float32)
  z2 = (z1 + 0.5 * rng.normal(size=(b, t, d))).astype(np.float32)
  mask = np.arange(t)[None] < rng.integers(3, t + 1, size=b)[:, None]
  cb = np.asarray(normalize_codebook(rng.normal(size=(k, d)).astype(np.float32)))
  state = init_codebook(jax.random.key(0), k, d)

  def run(z1, z2, mask):
    loss = spin_loss(z1, z2, cb, mask).loss
    grad = jax.grad(lambda a: spin_loss(a, z2, cb, mask).loss)(z1)
    codes, _ = nearest_codeword(z1, codebook_embeddings(state))
    new = codebook_update(state, z1, codes, mask)
    c, inertia = kmeans_step(z1, mask, z1[0, :k])
    return loss, grad, new.sums, new.counts, c, inertia

  f = jax.jit(run)
  d0 = jax.devices()[0]
  single = [np.asarray(a) for a in f(*(jax.device_put(a, d0) for a in (z1, z2, mask)))]
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sh = NamedSharding(mesh, P("data"))
  out = f(*(jax.device_put(a, sh) for a in (z1, z2, mask)))
  assert len(out[1].sharding.device_set) == 8
  names = ["loss", "grad", "sums", "counts", "kmeans_centroids", "inertia"]
  for name, a, s in zip(names, out, single):
    np.testing.assert_allclose(np.asarray(a), s, rtol=2e-5, atol=1e-6, err_msg=name)
  print("OK")
  """
)


def test_sharded_ops_equal_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
