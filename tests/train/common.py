"""Shared helpers for the training tests: a small, fast variant of the HuBERT tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A CPU-fast model and batch: 2 layers of width 64, 0.5 s crops, batch 8 (divisible by 8 devices
# and by the 4 x 2 data x fsdp mesh).
SMALL_OVERRIDES = {
  'model': {
    'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 2,
    'intermediate_size': 128, 'conv_dim': (64,) * 7, 'num_conv_pos_embeddings': 16,
    'num_conv_pos_embedding_groups': 4,
  },
  'data.num_samples': 8000,
  'data.batch_size': 8,
  'method.num_clusters': 20,
  'method.kmeans_iters': 5,
  'method.kmeans_batches': 2,
  'method.final_dim': 32,
  'optim.warmup_steps': 2,
  'optim.learning_rate': 1e-3,
  'train.log_every': 1,
  'train.checkpoint_every': 0,
  'train.async_checkpointing': True,
}


def small_config(**overrides):
  """experiments/hubert.py:tiny with SMALL_OVERRIDES and `overrides` ('a.b' -> value; a dict
  value sets the fields it names)."""
  from experiments import hubert

  config = hubert.get_config('tiny')
  for key, value in {**SMALL_OVERRIDES, **overrides}.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    if isinstance(value, dict):
      for k, v in value.items():
        node[leaf][k] = v
    else:
      node[leaf] = value
  return config


def run_python(code: str, *, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter with `devices` fake CPU devices (XLA_FLAGS set before
  jax is imported)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
