r"""Cross-modal code matching (CMCM) on vs off on real paired audio-visual digits: tiny runs x
seeds, one table and a codeword x digit co-occurrence picture.

    python -m benchmarks.cmcm_study --out runs/cmcm_study [--seeds 0,1,2] [--variants on,off] \
        [--steps N]

Each run is `experiments/cmcm.py:tiny` with `method.cmcm_weight` = the config's (variant 'on')
or 0 (variant 'off': the summary-only baseline, same everything else), trained by the one
trainer (`jaxspeech.train.trainer.train_and_evaluate`) in its own workdir OUT/<variant>_s<seed>
(a finished run is reused as it is: its numbers and wall time are kept in
OUT/<variant>_s<seed>/study_run.json). Seed s sets `train.seed`, `data.seed` and the pairing seed
`method.pair_seed` (each seed holds out its own 2 of FSDD's 6 speakers and its own 20% of the
images: every test number is on unseen speakers AND unseen images). The run's final evaluation
is the `retrieval` task on the test split (`jaxspeech/eval/retrieval.py`: class-level R@k, a
retrieved item is correct when it shows the query's digit; exact chance for a random ranking).
`wall_s` is the run's wall time (data, compilation, 1,200 steps, the final evaluation) on this
machine.

After training, each run's test units are assigned to the shared codebook once more and counted
per (codeword, digit class) and modality (`retrieval.code_class_counts`): kept in
study_run.json, and drawn for the first seed of each variant as OUT/cooccurrence_<variant>.png:
the audio panel and the image panel side by side, one row per codeword used by either
modality (sorted by its most frequent digit), cell = P(digit | codeword) in that modality, and a
bar = the codeword's share of that modality's units. Drawn with Pillow (installed in the venv as
a dependency of tensorboard; not pinned by requirements.txt).

Outputs: OUT/results.json (every run's numbers, per-variant mean / sample standard deviation /
min / max, the checks below), OUT/results.md (the tables), also printed. Checks:
  above_chance       every run's a2i and i2a R@1 above chance
  cmcm_minus_off     mean(on) - mean(off) of each R@k (positive = CMCM helps)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from benchmarks import seed_study

VARIANTS = ('on', 'off')
DIRS = ('a2i', 'i2a')
KS = (1, 5, 10)
SUMMARY_KEYS = tuple(f'{p}{d}/R@{k}' for p in ('', 'summary/', 'codes/') for d in DIRS
                     for k in KS) + tuple(f'chance/{d}/R@{k}' for d in DIRS for k in KS) + (
  'codebook/used_audio', 'codebook/used_visual', 'codebook/used_both',
  'codebook/used_both_1pct', 'codebook/same_class_1pct', 'wall_s')


def run_config(variant: str, seed: int, steps: int | None):
  from experiments import cmcm

  c = cmcm.get_config('tiny')
  if variant == 'off':
    c.method.cmcm_weight = 0.0
  c.train.seed = c.data.seed = c.method.pair_seed = seed
  if steps:
    c.train.num_steps = steps
    c.train.log_every = min(int(c.train.log_every), steps)
  c.train.eval_every = int(c.train.num_steps)  # evaluate once, at the end
  return c


def cooccurrence(workdir: str) -> dict[str, list]:
  """Per modality, `[V, K]` unit counts per (codeword, digit) on the run's test split."""
  from jaxspeech import workdir as workdir_lib
  from jaxspeech.eval import retrieval

  ctx = workdir_lib.load_context(workdir)
  _, arrays = retrieval.retrieval_metrics(ctx, ctx.rows('test'))
  emb, labels = arrays['emb'], arrays['labels']
  v = emb['audio']['code_dist'].shape[1]
  k = int(ctx.config.method.num_classes)
  return {m: retrieval.code_class_counts(emb[m]['codes'], emb[m]['mask'], labels[m], v,
                                         k).tolist() for m in retrieval.MODALITIES}


def run_one(out_dir: str, variant: str, seed: int, steps: int | None) -> dict:
  config = run_config(variant, seed, steps)
  extra = lambda workdir, metrics: {  # noqa: E731
    'cmcm_weight': float(config.method.cmcm_weight),
    'summary_loss': float(metrics.get('summary_loss', np.nan)),
    'cooccurrence': cooccurrence(workdir)}
  return seed_study.run_record(out_dir, variant, seed, config, extra)


def summarize(runs: list[dict]) -> dict:
  return seed_study.summarize(runs, VARIANTS, lambda r: [k for k in SUMMARY_KEYS if k in r])


def checks(runs: list[dict], summary: dict) -> dict:
  out = {'above_chance': all(r[f'{d}/R@1'] > r[f'chance/{d}/R@1'] for r in runs for d in DIRS)}
  if 'on' in summary and 'off' in summary:
    out['cmcm_minus_off'] = {f'{d}/R@{k}': summary['on'][f'{d}/R@{k}']['mean']
                             - summary['off'][f'{d}/R@{k}']['mean'] for d in DIRS for k in KS}
  return out


def tables(runs: list[dict], summary: dict) -> str:
  def pm(s, scale=100.0, digits=1):
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"

  seeds = sorted({r['seed'] for r in runs})
  first = next(iter(summary.values()))
  lines = [f'Class-level retrieval on unseen speakers and unseen images (test split: '
           f'{int(runs[0]["num_audio"])} clips x {int(runs[0]["num_images"])} distinct images '
           f'per seed), recall@k (%), mean ± sample std over seeds {seeds}. A retrieved item is '
           'correct when it shows the query\'s digit; chance = a random ranking (exact).', '',
           '| variant | a2i R@1 | a2i R@5 | a2i R@10 | i2a R@1 | i2a R@5 | i2a R@10 | '
           'codewords used by both (>= 1 unit / >= 1% each / same top digit) | wall s |',
           '|---|---|---|---|---|---|---|---|---|']
  for v, s in summary.items():
    name = {'on': 'CMCM on', 'off': 'CMCM off (summary only)'}[v]
    cells = [pm(s[f'{d}/R@{k}']) for d in DIRS for k in KS]
    used = ' / '.join(pm(s[f'codebook/{k}'], 1.0) for k in ('used_both', 'used_both_1pct',
                                                             'same_class_1pct'))
    lines.append(f"| {name} | {' | '.join(cells)} | {used} | {pm(s['wall_s'], 1.0, 0)} |")
  chance = [f"{100 * first[f'chance/{d}/R@{k}']['mean']:.1f}" for d in DIRS for k in KS]
  lines.append(f"| chance | {' | '.join(chance)} | - | - |")
  size = int(runs[0]['codebook/size'])
  lines += ['', f'Codebook of {size} codewords; per modality, codewords that are the nearest one '
            'of >= 1 test unit (audio / image), mean ± std:', '']
  for v, s in summary.items():
    lines.append(f"- {v}: audio {pm(s['codebook/used_audio'], 1.0)}, image "
                 f"{pm(s['codebook/used_visual'], 1.0)}")
  lines += ['', 'The two parts of the similarity alone (R@k %, mean ± std): summary = cosine of '
            'the summary embeddings, codes = the CMCM similarity of the code distributions (the '
            "baseline's codebook only observed its units):", '',
            '| variant | part | a2i R@1 | a2i R@5 | i2a R@1 | i2a R@5 |',
            '|---|---|---|---|---|---|']
  for v, s in summary.items():
    for part in ('summary', 'codes'):
      cells = [pm(s[f'{part}/{d}/R@{k}']) for d in DIRS for k in (1, 5)]
      lines.append(f"| {v} | {part} | {' | '.join(cells)} |")
  lines += ['', 'Per run:', '', '| variant | seed | a2i R@1 | a2i R@5 | i2a R@1 | i2a R@5 | '
            'used both | train loss | wall s |', '|---|---|---|---|---|---|---|---|---|']
  for r in runs:
    cells = [f"{100 * r[f'{d}/R@{k}']:.1f}" for d in DIRS for k in (1, 5)]
    lines.append(f"| {r['variant']} | {r['seed']} | {' | '.join(cells)} | "
                 f"{int(r['codebook/used_both'])} | {r['train_loss']:.3f} | {r['wall_s']} |")
  return '\n'.join(lines)


def draw_cooccurrence(counts: dict[str, np.ndarray], path: str, title: str = '',
                      cell: int = 14) -> tuple[int, int]:
  """Draws the audio and image `[V, K]` (codeword, class) counts side by side as a PNG (see the
  module docstring); returns its (width, height)."""
  from PIL import Image, ImageDraw, ImageFont

  panels = (('audio', 'audio (spoken digits)'), ('visual', 'image (digit scans)'))
  c = {m: np.asarray(counts[m], np.float64) for m, _ in panels}
  v, k = c['audio'].shape
  share = {m: c[m].sum(1) / max(c[m].sum(), 1.0) for m, _ in panels}  # [V]
  cond = {m: c[m] / np.maximum(c[m].sum(1, keepdims=True), 1.0) for m, _ in panels}  # P(k | v)
  used = np.flatnonzero((c['audio'].sum(1) > 0) | (c['visual'].sum(1) > 0))
  pooled = cond['audio'] + cond['visual']
  order = sorted(used, key=lambda i: (int(np.argmax(pooled[i])), -share['audio'][i]
                                      - share['visual'][i]))
  font = ImageFont.load_default()
  label_w, bar_w, gap, top = 34, 40, 24, 46
  panel_w = k * cell + 6 + bar_w
  width = label_w + 2 * panel_w + gap + 10
  height = top + max(len(order), 1) * cell + 30
  img = Image.new('RGB', (width, height), 'white')
  d = ImageDraw.Draw(img)
  d.text((4, 2), title, fill='black', font=font)
  for p, (m, name) in enumerate(panels):
    x0 = label_w + p * (panel_w + gap)
    d.text((x0, 16), name, fill='black', font=font)
    for j in range(k):
      d.text((x0 + j * cell + 3, top - 14), str(j), fill='black', font=font)
    d.text((x0 + k * cell + 6, top - 14), 'share', fill='black', font=font)
    smax = max(float(share[m].max()), 1e-12)
    for row, i in enumerate(order):
      y = top + row * cell
      if p == 0:
        d.text((2, y + 1), f'{i:3d}', fill='black', font=font)
      for j in range(k):
        q = cond[m][i, j]
        shade = (int(255 * (1 - q)), int(255 * (1 - 0.7 * q)), 255) if c[m][i].sum() else (
          235, 235, 235)  # white -> blue; grey = the codeword is unused in this modality
        d.rectangle([x0 + j * cell, y, x0 + (j + 1) * cell - 1, y + cell - 1], fill=shade,
                    outline=(210, 210, 210))
      bw = int(round(bar_w * share[m][i] / smax))
      if bw:
        d.rectangle([x0 + k * cell + 6, y + 3, x0 + k * cell + 6 + bw, y + cell - 4],
                    fill=(200, 80, 40))
  d.text((4, height - 14), 'rows: codewords used by either modality; cell: P(digit | codeword); '
         'grey: unused in that modality', fill='black', font=font)
  img.save(path)
  return img.size


def main(argv=None) -> int:

  p = argparse.ArgumentParser(prog='python -m benchmarks.cmcm_study',
                              description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/cmcm_study')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--steps', type=int, default=0, help='train.num_steps (0 = the tiny config)')
  a = p.parse_args(argv)
  runs = seed_study.run_grid(
    p, a, VARIANTS, lambda v, seed: run_one(a.out, v, seed, a.steps or None),
    lambda r: {k: x for k, x in r.items() if k != 'cooccurrence'})
  variants = a.variants.split(',')
  summary = summarize(runs)
  pngs = {}
  for v in variants:
    r = next(r for r in runs if r['variant'] == v)
    pngs[v] = os.path.join(a.out, f'cooccurrence_{v}.png')
    draw_cooccurrence(r['cooccurrence'], pngs[v],
                      f"CMCM {v} (cmcm_weight {r['cmcm_weight']:g}), seed {r['seed']}: test "
                      'units per codeword and digit')
  c = run_config(variants[0], 0, a.steps or None)
  result = {'runs': runs, 'summary': summary, 'checks': checks(runs, summary),
            'steps': int(c.train.num_steps), 'codebook_size': int(c.method.codebook_size),
            'cmcm_weight': float(c.method.cmcm_weight), 'alpha': float(c.method.alpha),
            'png': pngs}
  with open(os.path.join(a.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = tables(runs, summary)
  md += (f"\n\nSteps {result['steps']}; codebook {result['codebook_size']}; CMCM on: "
         f"cmcm_weight {result['cmcm_weight']:g}, alpha {result['alpha']:g}. Checks: "
         f"{json.dumps(result['checks'])}\nCo-occurrence: {', '.join(pngs.values())}\n")
  with open(os.path.join(a.out, 'results.md'), 'w') as f:
    f.write(md)
  print(md)
  return 0


if __name__ == '__main__':
  from jaxspeech.errors import run_cli

  sys.exit(run_cli(main, prog='python -m benchmarks.cmcm_study'))
