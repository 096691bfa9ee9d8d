"""Activation logical axes: identity without a context; same numbers under an 8-device mesh."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxspeech.layers import partitioning as part
    from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder
    assert jax.device_count() == 8
    model = SpeechEncoder(EncoderConfig.preset("tiny", model_type="wavlm"), rngs=nnx.Rngs(0))
    wav = jax.random.normal(jax.random.key(0), (8, 6400))
    ref = jax.jit(lambda w: model(w).last_hidden_state)(wav)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rules = {part.ACT_BATCH: "data", part.ACT_MLP: "model", part.ACT_HEADS: "model"}
    def run(w):
      with part.activation_sharding(mesh, rules):
        return model(w).last_hidden_state
    f = jax.jit(run)
    got = f(jax.device_put(wav, NamedSharding(mesh, P("data"))))
    hlo = f.lower(wav).as_text()
    n_constraints = hlo.count("sharding_constraint") + hlo.count("@Sharding")
    assert n_constraints >= 3 * model.config.num_hidden_layers, n_constraints
    err = float(jnp.max(jnp.abs(got - ref)))
    assert err < 1e-5, err
    print("OK", n_constraints, err)
""")


def test_constraints_keep_numbers_on_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
