r"""Writes tests/parity/data/torchaudio_mfcc.json: fairseq's HuBERT MFCC features computed by
torchaudio, the reference of tests/parity/test_mfcc_parity.py.

What it computes is fairseq's `examples/hubert/simple_kmeans/dump_mfcc_feature.py`
(`MfccFeatureReader.get_feats`), on one utterance at a time:

    mfccs = torchaudio.compliance.kaldi.mfcc(waveform=x, sample_frequency=16000, use_energy=False)
    deltas = torchaudio.functional.compute_deltas(mfccs.T); ddeltas = compute_deltas(deltas)
    concat = cat([mfccs.T, deltas, ddeltas]).T                      # [F, 39]

with x the samples as soundfile reads them, in [-1, 1] ('fairseq'), and again with x * 32768
(Kaldi's int16 scale, 'kaldi'), on two excerpts of real recordings in ../shared/data chosen to
contain quiet frames (mel energies at the log floor in the fairseq scale).

torchaudio is not a dependency of the project (its wheels pin an older torch). Its
`compliance.kaldi` and `functional.compute_deltas` are pure Python over torch; run this with the
wheel's Python files only (its C extension is neither needed nor loadable against our torch):

    pip download --no-deps torchaudio==2.11.0 -d /tmp/ta
    unzip -q /tmp/ta/torchaudio-2.11.0-*.whl -d /tmp/ta/pkg -x 'torchaudio/lib/*'
    PYTHONPATH=/tmp/ta/pkg .venv/bin/python scripts/torchaudio_mfcc_reference.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np
import soundfile as sf

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
SHARED = os.path.join(ROOT, '..', 'shared', 'data')
OUT = os.path.join(ROOT, 'tests', 'parity', 'data', 'torchaudio_mfcc.json')
# (file under ../shared/data, first sample, number of samples): two lengths, both with frames
# whose mel energies hit the float32-eps log floor when fed in [-1, 1].
CLIPS = (
  ('speechbrain-samples/ASR/spk1_snt1.wav', 25_600, 9_000),
  ('librispeech-excerpt/1688/1688-142285-0000.flac', 0, 5_600),
)


def clip_int16(path: str, start: int, num: int) -> np.ndarray:
  """The int16 samples of a clip (16 kHz PCM16 / FLAC 16-bit)."""
  x, sr = sf.read(os.path.join(SHARED, path), dtype='int16')
  assert sr == 16_000, (path, sr)
  return x[start:start + num]


def sha256(x: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(x, '<i2').tobytes()).hexdigest()


def fairseq_mfcc(x):
  """dump_mfcc_feature.py's get_feats on a [S] float32 waveform -> [F, 39] float32."""
  import torch
  import torchaudio

  with torch.no_grad():
    x = torch.from_numpy(x).float().view(1, -1)
    mfccs = torchaudio.compliance.kaldi.mfcc(waveform=x, sample_frequency=16_000,
                                             use_energy=False).transpose(0, 1)  # [13, F]
    deltas = torchaudio.functional.compute_deltas(mfccs)
    ddeltas = torchaudio.functional.compute_deltas(deltas)
    return torch.cat([mfccs, deltas, ddeltas], dim=0).transpose(0, 1).numpy()


def floats(a: np.ndarray) -> list:
  """float32 values as the shortest decimal that reads back to the same float32."""
  return [[float(np.format_float_positional(v, unique=True, trim='-')) for v in row]
          for row in np.asarray(a, np.float32)]


def main() -> None:
  import torch
  import torchaudio

  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--out', default=OUT)
  args = ap.parse_args()
  clips = []
  for path, start, num in CLIPS:
    x16 = clip_int16(path, start, num)
    x = x16.astype(np.float32) / 32768.0  # what soundfile's float read gives
    clips.append({
      'path': path, 'start': start, 'num_samples': num, 'sha256_int16': sha256(x16),
      'fairseq': floats(fairseq_mfcc(x)),
      'kaldi': floats(fairseq_mfcc(x * 32768.0)),
    })
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'made_by': 'scripts/torchaudio_mfcc_reference.py',
               'torchaudio': torchaudio.__version__, 'torch': torch.__version__,
               'clips': clips}, f, separators=(',', ':'))
    f.write('\n')
  print(f'wrote {args.out} ({os.path.getsize(args.out)} bytes)')


if __name__ == '__main__':
  main()
