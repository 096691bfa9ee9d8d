"""examples/spin_loss_in_your_loop.py: a user's own loop on the public API trains what it says
(the top block, the head, the codebook), leaves the rest frozen, and prints finite losses."""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, 'examples', 'spin_loss_in_your_loop.py')


def _load_example():
  spec = importlib.util.spec_from_file_location('spin_loss_in_your_loop', EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_example_trains_two_steps(capsys):
  ex = _load_example()
  res = ex.main(['--steps', '2', '--batch', '2', '--seconds', '0.5'])

  printed = [float(x) for x in re.findall(r'^step \d+ loss (\S+)$', capsys.readouterr().out, re.M)]
  assert len(printed) == 2 and all(math.isfinite(x) for x in printed), printed
  np.testing.assert_allclose(printed, res['losses'], atol=1e-4)
  # Swapped prediction: a cross-entropy over K=64 codes, at most log K plus the Sinkhorn gap.
  assert 0.0 < printed[0] < 2 * math.log(64)

  # Every trainable leaf moved; the trainable set is exactly head + codebook + the top block.
  delta = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       res['initial'], res['final'])
  assert sorted(delta) == ['codebook', 'encoder', 'head']
  assert list(delta['encoder']['encoder']['layers']) == [3]  # the tiny encoder's top block
  assert all(d > 0 for d in jax.tree.leaves(delta)), delta
  codebook = np.asarray(res['final']['codebook'])
  np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, atol=1e-5)

  # The frozen encoder is bit-for-bit the initial one (same seed), and the model holds the result.
  model = res['model']
  fresh = ex.SpeechEncoder(ex.EncoderConfig.preset('tiny'), rngs=nnx.Rngs(0))
  got = nnx.to_pure_dict(nnx.state(model.encoder, nnx.Param))
  want = nnx.to_pure_dict(nnx.state(fresh, nnx.Param))
  top = got['encoder']['layers'].pop(3)
  want['encoder']['layers'].pop(3)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(np.testing.assert_array_equal, top, res['final']['encoder']['encoder']['layers'][3])
