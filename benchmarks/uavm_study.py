r"""UAVM vs its baselines on real paired audio-visual digits: tiny runs x seeds, one table.

    python -m benchmarks.uavm_study --out runs/uavm_study [--seeds 0,1,2] \
        [--variants shared,separate,fusion] [--steps N] [--upper-dim U]

Each run is `experiments/uavm.py:tiny` with `method.sharing` = the variant, trained by the one
trainer (`jaxspeech.train.trainer.train_and_evaluate`) in its own workdir OUT/<variant>_s<seed>
(a finished run is reused as it is: its numbers and wall time are kept in
OUT/<variant>_s<seed>/study_run.json). Seed s sets `train.seed`, `data.seed` and the pairing
seed `method.pair_seed` (so each seed also holds out its own 2 of FSDD's 6 speakers and its own
20% of the images: every test number is on unseen speakers AND unseen images). The run's final
evaluation is `av_classification` on the test split with the modality probe (`fit_split='test'`:
the reference's protocol, an L1 logistic regression fitted on a seeded half of the test rows'
per-layer representations and scored on the other half; fitting on the training rows instead
would mix in the train -> unseen-speaker shift).

Outputs: OUT/results.json (every run's numbers, per-variant mean / sample standard deviation /
min / max, the checks below) and OUT/results.md (the tables), also printed. Checks:
  av_above_unimodal  for 'shared' (UAVM), AV accuracy > audio-only and > video-only in every seed
  shared_more_agnostic  the mean probe accuracy over the upper-stage layers is lower (nearer
                        0.5) for 'shared' than for 'separate'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from benchmarks import seed_study

VARIANTS = ('shared', 'separate', 'fusion')
ACCS = ('audio', 'visual', 'av')


def run_config(variant: str, seed: int, steps: int | None, upper_dim: int | None = None):
  from experiments import uavm

  c = uavm.get_config('tiny')
  c.method.sharing = variant
  if upper_dim is not None:
    c.method.upper_dim = upper_dim
  c.train.seed = c.data.seed = c.method.pair_seed = seed
  if steps:
    c.train.num_steps = steps
  c.train.eval_every = int(c.train.num_steps)  # evaluate once, at the end (with the probe)
  with c.unlocked():
    c.evals.test.fit_split = 'test'  # the reference's probe protocol: halves of the test rows
  return c


def run_one(out_dir: str, variant: str, seed: int, steps: int | None,
            upper_dim: int | None = None) -> dict:
  return seed_study.run_record(out_dir, variant, seed, run_config(variant, seed, steps, upper_dim))


def summarize(runs: list[dict]) -> dict:
  return seed_study.summarize(runs, VARIANTS,
                              lambda r: [k for k in r if k in ACCS or k.startswith('probe/')])


def upper_layers(num_layers: int, depth_i: int) -> list[int]:
  """Probe layer indices of the upper (shared / separate / fusion) stage: depth_i+1 .. L."""
  return list(range(depth_i + 1, num_layers + 1))


def checks(runs: list[dict], summary: dict, depth_i: int) -> dict:
  out = {}
  shared = [r for r in runs if r['variant'] == 'shared']
  if shared:
    out['av_above_unimodal'] = all(r['av'] > r['audio'] and r['av'] > r['visual'] for r in shared)
  if 'shared' in summary and 'separate' in summary:
    layers = sorted(int(k.split('_')[-1]) for k in summary['shared'] if k.startswith('probe/'))
    up = upper_layers(max(layers), depth_i)
    mean = {v: float(np.mean([summary[v][f'probe/layer_{i}']['mean'] for i in up]))
            for v in ('shared', 'separate')}
    out['upper_probe_mean'] = mean
    out['shared_more_agnostic'] = mean['shared'] < mean['separate']
  return out


def tables(runs: list[dict], summary: dict, depth_i: int) -> str:
  def pm(s):
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

  seeds = sorted({r['seed'] for r in runs})
  lines = [f'Test accuracy (%) on unseen speakers and unseen images, mean ± sample std over '
           f'seeds {seeds}:', '',
           '| variant | audio only | video only | AV | AV > audio and > video (every seed) |',
           '|---|---|---|---|---|']
  for v, s in summary.items():
    rs = [r for r in runs if r['variant'] == v]
    ok = all(r['av'] > r['audio'] and r['av'] > r['visual'] for r in rs)
    lines.append(f"| {v} | {pm(s['audio'])} | {pm(s['visual'])} | {pm(s['av'])} | "
                 f"{'yes' if ok else 'no'} |")
  layers = sorted({int(k.split('_')[-1]) for s in summary.values() for k in s
                   if k.startswith('probe/')})
  if layers:
    lines += ['', 'Modality probe (L1 logistic regression, audio vs video, on each layer\'s '
              'pooled hidden state; fitted on half of the test rows, accuracy % on the other '
              'half; 50 = modality-agnostic):', '',
              '| layer | stage | ' + ' | '.join(summary) + ' |',
              '|---|---|' + '---|' * len(summary)]
    for i in layers:
      stage = 'input' if i == 0 else ('modality-specific' if i <= depth_i else 'upper')
      cells = [pm(s[f'probe/layer_{i}']) if f'probe/layer_{i}' in s else '-'
               for s in summary.values()]
      lines.append(f'| {i} | {stage} | ' + ' | '.join(cells) + ' |')
  lines += ['', 'Per run:', '', '| variant | seed | audio | video | AV | wall s |',
            '|---|---|---|---|---|---|']
  for r in runs:
    lines.append(f"| {r['variant']} | {r['seed']} | {100 * r['audio']:.1f} | "
                 f"{100 * r['visual']:.1f} | {100 * r['av']:.1f} | {r['wall_s']} |")
  return '\n'.join(lines)


def main(argv=None) -> int:

  p = argparse.ArgumentParser(prog='python -m benchmarks.uavm_study',
                              description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/uavm_study')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--steps', type=int, default=0, help='train.num_steps (0 = the tiny config)')
  p.add_argument('--upper-dim', type=int, default=-1,
                 help="method.upper_dim, the upper stages' width (-1 = the tiny config's; "
                 '0 = the modality stages\' width)')
  a = p.parse_args(argv)
  upper_dim = None if a.upper_dim < 0 else a.upper_dim
  runs = seed_study.run_grid(p, a, VARIANTS,
                             lambda v, seed: run_one(a.out, v, seed, a.steps or None, upper_dim))
  variants = a.variants.split(',')
  depth_i = int(run_config(variants[0], 0, None).method.depth_i)
  summary = summarize(runs)
  c = run_config(variants[0], 0, a.steps or None, upper_dim)
  result = {'runs': runs, 'summary': summary, 'checks': checks(runs, summary, depth_i),
            'steps': int(c.train.num_steps), 'dim': int(c.method.dim),
            'upper_dim': int(c.method.upper_dim) or int(c.method.dim)}
  with open(os.path.join(a.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = tables(runs, summary, depth_i)
  md += (f"\n\nSteps {result['steps']}; modality-stage width {result['dim']}, upper-stage width "
         f"{result['upper_dim']}. Checks: {json.dumps(result['checks'])}\n")
  with open(os.path.join(a.out, 'results.md'), 'w') as f:
    f.write(md)
  print(md)
  return 0


if __name__ == '__main__':
  from jaxspeech.errors import run_cli

  sys.exit(run_cli(main, prog='python -m benchmarks.uavm_study'))
