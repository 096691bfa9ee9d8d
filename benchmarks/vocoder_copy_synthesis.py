r"""Copy synthesis: a trained vocoder vs Griffin-Lim on held-out utterances.

    python -m benchmarks.vocoder_copy_synthesis --workdir runs/vocoder_tiny --num 20 \
        [--out runs/vocoder_tiny/samples] [--split test] [--gl-iters 60] [--wavs 3]

For each of the first `--num` utterances of split `--split` of the workdir's corpus (its
`config.data.manifest`, or the built-in corpus it was trained on), peak-normalised to 0.95 as in
training: real audio -> `log_mel` -> (a) the workdir's vocoder (`predict_fns()['vocode']`, latest
checkpoint) and (b) `griffin_lim` (fast Griffin-Lim, `--gl-iters` iterations, from the mel
filters' pseudo-inverse). Score: the mean absolute difference between the log-mel of the
resynthesised audio and that of the original (natural-log units, all 80 bins and every frame of
the utterance; 0 = the same mel). Utterances are zero-padded to a common length (a multiple of
the hop) and synthesised as one batch, then cut back to their own length before scoring.

Writes `results.json` and, for the first `--wavs` utterances, `<id>_real.wav`,
`<id>_vocoder.wav`, `<id>_griffin_lim.wav` (16 kHz, soundfile) to `--out`
(default WORKDIR/samples); prints the results as one JSON line.

Legend: N utterances, S samples (padded), T frames, M mel bins.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def load_utterances(config, method, split: str, num: int) -> list[dict]:
  """The first `num` rows of `split` of the workdir's manifest, each with its peak-normalised
  waveform under 'wav'."""
  from data_pipelines.manifest import read_manifest
  from jaxspeech.audio import load_audio, peak_normalize

  path = str(config.data.manifest) or method.default_manifest(config.data)
  rows = [r for r in read_manifest(path) if r.get('split') == split][:num]
  if not rows:
    raise SystemExit(f'{path}: no rows of split {split!r}')
  for r in rows:
    r['wav'] = peak_normalize(load_audio(r['path'], expect_sr=r.get('sample_rate')))
  return rows


def log_mel_l1(x: np.ndarray, ref_mel: np.ndarray) -> float:
  """Mean |log_mel(x) - ref_mel| for one utterance x [S], ref_mel [T, M]."""
  import jax.numpy as jnp

  from jaxspeech.ops.mel import log_mel

  return float(np.mean(np.abs(np.asarray(log_mel(jnp.asarray(x[None])))[0] - ref_mel)))


def run(workdir: str, num: int, out: str, split: str = 'test', gl_iters: int = 60,
        wavs: int = 3, seed: int = 0) -> dict:
  import jax
  import jax.numpy as jnp
  import soundfile as sf

  from jaxspeech.ops.mel import MelConfig, griffin_lim, log_mel
  from jaxspeech.train import checkpoint as ckpt_lib
  from jaxspeech.train import workdir_contract as contract

  method, model, config, _ = ckpt_lib.load_workdir_model(workdir)
  step = contract.checkpoint_steps(os.path.abspath(workdir))[-1]
  vocode = jax.jit(method.predict_fns(model, None)['vocode'])
  rows = load_utterances(config, method, split, num)
  hop = MelConfig().hop
  lengths = [len(r['wav']) for r in rows]
  s = -(-max(lengths) // hop) * hop
  batch = np.zeros((len(rows), s), np.float32)  # [N, S]
  for i, r in enumerate(rows):
    batch[i, :lengths[i]] = r['wav']
  mel = jax.jit(log_mel)(jnp.asarray(batch))  # [N, T, M]
  jax.block_until_ready(vocode(mel[:1]))  # compile outside the timing
  t0 = time.perf_counter()
  voc = np.asarray(jax.block_until_ready(vocode(mel)))[:, :s]  # [N, T * hop] -> [N, S]
  t_voc = time.perf_counter() - t0
  gl_fn = jax.jit(lambda m, k: griffin_lim(m, s, k, n_iter=gl_iters))
  jax.block_until_ready(gl_fn(mel[:1], jax.random.key(seed)))
  t0 = time.perf_counter()
  gl = np.asarray(jax.block_until_ready(gl_fn(mel, jax.random.key(seed))))
  t_gl = time.perf_counter() - t0
  scores = {'vocoder': [], 'griffin_lim': []}
  for i, n in enumerate(lengths):
    ref = np.asarray(log_mel(jnp.asarray(batch[None, i, :n])))[0]  # [T_i, M]
    scores['vocoder'].append(log_mel_l1(voc[i, :n], ref))
    scores['griffin_lim'].append(log_mel_l1(gl[i, :n], ref))
  os.makedirs(out, exist_ok=True)
  written = []
  for i, r in enumerate(rows[:wavs]):
    stem = os.path.splitext(os.path.basename(r['path']))[0]
    for name, x in (('real', batch[i]), ('vocoder', voc[i]), ('griffin_lim', gl[i])):
      path = os.path.join(out, f'{stem}_{name}.wav')
      sf.write(path, np.clip(x[:lengths[i]], -1.0, 1.0), 16000, subtype='PCM_16')
      written.append(path)
  audio_s = sum(lengths) / 16000
  result = {
    'workdir': os.path.abspath(workdir), 'step': int(step), 'split': split, 'num': len(rows),
    'audio_seconds': round(audio_s, 2), 'griffin_lim_iters': gl_iters,
    'log_mel_l1': {k: float(np.mean(v)) for k, v in scores.items()},
    'log_mel_l1_std': {k: float(np.std(v)) for k, v in scores.items()},
    'vocoder_better_on': int(sum(a < b for a, b in zip(scores['vocoder'],
                                                      scores['griffin_lim']))),
    'seconds': {'vocoder': round(t_voc, 3), 'griffin_lim': round(t_gl, 3)},
    'per_utterance': {k: [round(x, 4) for x in v] for k, v in scores.items()},
    'wavs': written,
  }
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='a vocoder training workdir')
  p.add_argument('--num', type=int, default=20, help='utterances of the split to score')
  p.add_argument('--out', default='', help='folder for results.json and WAVs (WORKDIR/samples)')
  p.add_argument('--split', default='test')
  p.add_argument('--gl-iters', type=int, default=60)
  p.add_argument('--wavs', type=int, default=3, help='utterances written as WAV triples')
  p.add_argument('--seed', type=int, default=0, help="Griffin-Lim's initial phases")
  args = p.parse_args(argv)
  out = args.out or os.path.join(args.workdir, 'samples')
  result = run(args.workdir, args.num, out, args.split, args.gl_iters, args.wavs, args.seed)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
