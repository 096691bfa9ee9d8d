"""Paired audio-visual rows (the AV-MNIST construction): spoken digits (FSDD) paired by class with
handwritten digit scans (scikit-learn's `load_digits`), so that test speakers AND test images are
never seen in training.

    python -m data_pipelines.av_pairs --fsdd ../shared/data/fsdd --out av.jsonl --seed 0 \
        [--test-speakers 2 --image-test-fraction 0.2]

Rows (JSON Lines, one per FSDD clip; `write_manifest`, atomic; the keys in this order):

  id           the clip's FSDD name, e.g. "3_theo_7"
  split        "train" | "test"
  label        digit 0..9 (the clip's digit = the image's digit)
  path         audio file (absolute), n_samples / sample_rate (8 kHz) / speaker as in
               `data_pipelines.manifest` (every file is decoded while building)
  image        the paired scan: 64 grey levels 0..16, row-major (8 x 8)
  image_index  its index in `sklearn.datasets.load_digits()` (0..1796)

Split (a pure function of `seed`):
  speakers  `test_speakers` of FSDD's 6 speakers (a seeded choice) are test speakers; all their
            clips are "test", every other speaker's clips are "train".
  images    the 1,797 scans are split by `data_pipelines.tabular.digits_rows(test_fraction, seed)`
            (a seeded permutation; the same split as the digits manifest of that seed).
  pairing   within a split and a digit class, the clips (in a seeded order) take the class's
            images of that split in a seeded order, cycling: every image of the split is used
            (about equally often; train 2,000 clips vs ~1,438 images, test 1,000 vs ~359), and a
            test clip is only ever paired with a test image.

A "visual clip" is the image's 8 rows read top to bottom as a sequence of 8 frames x 8 features
(`jaxspeech.methods.uavm` reads it that way), so both modalities are feature sequences.
`cached_manifest` builds the manifest once under the cache folder ($JAXSPEECH_CACHE or
~/.cache/jaxspeech), which is what `experiments/uavm.py` uses when `config.data.manifest` is ''.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence

import numpy as np

from data_pipelines.manifest import ManifestError, build_manifest, write_manifest
from jaxspeech.errors import run_cli

VERSION = 1  # bump when the rows change (invalidates cached manifests)
KEYS = ('id', 'split', 'label', 'path', 'n_samples', 'sample_rate', 'speaker', 'image',
        'image_index')
IMAGE_SHAPE = (8, 8)  # load_digits: 8 x 8 grey levels 0..16; a visual clip = 8 row-frames of 8
# The shared data folder beside the project (../shared/data/fsdd), or $JAXSPEECH_FSDD.
DEFAULT_FSDD = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
  os.path.abspath(__file__)))), 'shared', 'data', 'fsdd')


def default_fsdd_root() -> str:
  return os.environ.get('JAXSPEECH_FSDD') or DEFAULT_FSDD


def choose_test_speakers(speakers: Sequence[str], num_test: int, seed: int) -> list[str]:
  """`num_test` of the distinct `speakers`, a seeded choice (sorted)."""
  pool = sorted(set(speakers))
  if not 1 <= num_test < len(pool):
    raise ValueError(f'test_speakers={num_test}: need 1 <= n < {len(pool)} (speakers {pool})')
  order = np.random.default_rng([seed, 0xA5]).permutation(len(pool))
  return sorted(pool[i] for i in order[:num_test])


def pair_rows(audio_rows: Sequence[dict], image_rows: Sequence[dict], test_speakers: Sequence[str],
              seed: int = 0) -> list[dict]:
  """Pairs every audio row with an image row of its class and split.

  audio_rows: {id, path, n_samples, sample_rate, speaker, digit}; image_rows: {image (64 ints),
  label, split} in `load_digits` order (their position is `image_index`). Returns rows with
  `KEYS`, sorted by id. Raises ValueError when a (split, class) has clips but no image.
  """
  test_speakers = set(test_speakers)
  images = {}  # (split, label) -> [image_index]
  for i, r in enumerate(image_rows):
    images.setdefault((r['split'], int(r['label'])), []).append(i)
  clips = {}  # (split, label) -> [audio row]
  for r in audio_rows:
    split = 'test' if r['speaker'] in test_speakers else 'train'
    clips.setdefault((split, int(r['digit'])), []).append(r)
  out = []
  for (split, label), group in sorted(clips.items()):
    pool = images.get((split, label), [])
    if not pool:
      raise ValueError(f'no {split} image of digit {label} to pair with {len(group)} clips')
    rng = np.random.default_rng([seed, 0x5EED, split == 'test', label])
    group = sorted(group, key=lambda r: r['id'])
    clip_order = rng.permutation(len(group))
    image_order = rng.permutation(pool)
    for k, j in enumerate(clip_order):
      a, i = group[j], int(image_order[k % len(pool)])
      out.append({'id': a['id'], 'split': split, 'label': label, 'path': a['path'],
                  'n_samples': int(a['n_samples']), 'sample_rate': int(a['sample_rate']),
                  'speaker': a['speaker'], 'image': [int(v) for v in image_rows[i]['image']],
                  'image_index': i})
  return sorted(out, key=lambda r: r['id'])


def av_pair_rows(fsdd_root: str | None = None, seed: int = 0, test_speakers: int = 2,
                 image_test_fraction: float = 0.2) -> list[dict]:
  """The paired manifest rows of the FSDD folder `fsdd_root` (default `default_fsdd_root()`)."""
  from data_pipelines.tabular import digits_rows

  root = fsdd_root or default_fsdd_root()
  if not os.path.isdir(root):
    raise ManifestError(f'{root}: no such folder (the FSDD corpus: --fsdd DIR or $JAXSPEECH_FSDD)')
  audio, _ = build_manifest(root, 'fsdd')
  spk = choose_test_speakers([r['speaker'] for r in audio], test_speakers, seed)
  return pair_rows(audio, digits_rows(image_test_fraction, seed), spk, seed)


def cached_manifest(cache_dir: str | None = None, fsdd_root: str | None = None, seed: int = 0,
                    test_speakers: int = 2, image_test_fraction: float = 0.2) -> str:
  """The paired manifest of these settings, built once under the cache folder (as
  `data_pipelines.tabular.cached_manifest`); the key holds the FSDD folder's absolute path."""
  from data_pipelines.synth import default_cache_dir

  root = os.path.abspath(fsdd_root or default_fsdd_root())
  tag = hashlib.sha1(root.encode()).hexdigest()[:10]
  name = f'fsdd-{tag}_seed{seed}_spk{test_speakers}_img{image_test_fraction}_v{VERSION}.jsonl'
  path = os.path.join(cache_dir or default_cache_dir(), 'av_pairs', name)
  if not os.path.exists(path):
    write_manifest(path, av_pair_rows(root, seed, test_speakers, image_test_fraction))
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m data_pipelines.av_pairs',
                              description=__doc__.split('\n')[0])
  p.add_argument('--fsdd', default='', help='FSDD folder (default: ../shared/data/fsdd or '
                 '$JAXSPEECH_FSDD)')
  p.add_argument('--out', required=True, help='manifest file to write (.jsonl)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--test-speakers', type=int, default=2, help='speakers held out for test')
  p.add_argument('--image-test-fraction', type=float, default=0.2)
  a = p.parse_args(argv)
  if not 0.0 < a.image_test_fraction < 1.0:
    p.error(f'--image-test-fraction={a.image_test_fraction}: must be in (0, 1)')
  if a.test_speakers < 1:
    p.error(f'--test-speakers={a.test_speakers}: must be >= 1')
  try:
    rows = av_pair_rows(a.fsdd or None, a.seed, a.test_speakers, a.image_test_fraction)
  except ValueError as e:
    if isinstance(e, ManifestError):
      raise
    raise ManifestError(str(e)) from None
  write_manifest(a.out, rows)
  test = [r for r in rows if r['split'] == 'test']
  print(f'wrote {a.out}: {len(rows)} pairs ({len(rows) - len(test)} train, {len(test)} test); '
        f'test speakers {sorted({r["speaker"] for r in test})}; '
        f'{len({r["image_index"] for r in rows})} distinct images')
  return 0


if __name__ == '__main__':
  sys.exit(run_cli(main, prog='python -m data_pipelines.av_pairs'))
