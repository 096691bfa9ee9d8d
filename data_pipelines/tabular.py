"""Manifests of rows that are not audio: handwritten digit scans and a 1-D toy distribution.

    python -m data_pipelines.tabular digits --out digits.jsonl [--test-fraction 0.2 --seed 0]
    python -m data_pipelines.tabular two_gaussians --out toy.jsonl [--num-rows 4096 --seed 0]

digits         scikit-learn's bundled `load_digits` (1,797 real 8x8 handwritten digit scans, grey
               levels 0..16): one row per image, {"id", "image": 64 ints row-major, "label",
               "split"}; the split is a seeded permutation of the images (test images unseen in
               training), `test_fraction` of them in "test".
two_gaussians  samples of the mixture 0.5 N(-2, 0.5^2) + 0.5 N(2, 0.5^2) (mean 0, variance 4.25):
               {"id", "x", "split": "train"}; the toy GAN's data.
Rows are written with `data_pipelines.manifest.write_manifest` (atomic).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from data_pipelines.manifest import write_manifest
from jaxspeech.errors import run_cli

TWO_GAUSSIANS = ((-2.0, 0.5), (2.0, 0.5))  # (mean, std) of the two equally likely components


def digits_rows(test_fraction: float = 0.2, seed: int = 0) -> list[dict]:
  from sklearn.datasets import load_digits

  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction={test_fraction}: must be in (0, 1)')
  d = load_digits()
  n = len(d.target)
  order = np.random.default_rng(seed).permutation(n)
  test = set(order[:int(round(test_fraction * n))].tolist())
  return [{'id': f'digit{i:04d}', 'image': d.images[i].astype(int).reshape(-1).tolist(),
           'label': int(d.target[i]), 'split': 'test' if i in test else 'train'}
          for i in range(n)]


def two_gaussians_rows(num_rows: int = 4096, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  comp = rng.integers(0, len(TWO_GAUSSIANS), num_rows)
  means = np.asarray([m for m, _ in TWO_GAUSSIANS])[comp]
  stds = np.asarray([s for _, s in TWO_GAUSSIANS])[comp]
  x = means + stds * rng.standard_normal(num_rows)
  return [{'id': f'x{i:05d}', 'x': float(v), 'split': 'train'} for i, v in enumerate(x)]


BUILDERS = {'digits': digits_rows, 'two_gaussians': two_gaussians_rows}


def cached_manifest(kind: str, cache_dir: str | None = None, **kwargs) -> str:
  """The manifest of `kind` with `kwargs`, built once under the cache folder
  ($JAXSPEECH_CACHE or ~/.cache/jaxspeech, as the built-in speech corpus)."""
  from data_pipelines.synth import default_cache_dir

  key = '_'.join(f'{k}{v}' for k, v in sorted(kwargs.items()))
  path = os.path.join(cache_dir or default_cache_dir(), 'tabular', f'{kind}_{key}.jsonl')
  if not os.path.exists(path):
    write_manifest(path, BUILDERS[kind](**kwargs))
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m data_pipelines.tabular', description=__doc__)
  p.add_argument('kind', choices=sorted(BUILDERS))
  p.add_argument('--out', required=True)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--test-fraction', type=float, default=0.2, help='digits only')
  p.add_argument('--num-rows', type=int, default=4096, help='two_gaussians only')
  a = p.parse_args(argv)
  if not 0.0 < a.test_fraction < 1.0:
    p.error(f'--test-fraction={a.test_fraction}: must be in (0, 1)')
  if a.num_rows < 1:
    p.error(f'--num-rows={a.num_rows}: must be >= 1')
  if a.kind == 'digits':
    rows = digits_rows(a.test_fraction, a.seed)
  else:
    rows = two_gaussians_rows(a.num_rows, a.seed)
  write_manifest(a.out, rows)
  print(f'wrote {len(rows)} rows to {a.out}')
  return 0


if __name__ == '__main__':
  sys.exit(run_cli(main, prog='python -m data_pipelines.tabular'))
