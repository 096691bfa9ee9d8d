r"""DinoSR fidelity ablation (issue 15): the tiny run as it was before the fixes, each fix alone,
and all of them together; codebook and k-means PNMI on held-out speakers, codebook usage and how
much the units encode the distance to the utterance edge.

    python -m benchmarks.dinosr_ablation --out runs/dinosr_ablation [--steps 2000] [--seeds 0] \
        [--variants baseline,fairseq_mask,...] [--k 64]

Every run is `experiments/dinosr.py:tiny` with the settings of `BEFORE` (the tiny recipe of the
README's DinoSR rows: exact 56.6% masking, the teacher EMAs `pos_conv`, dead-codeword restart
patience 10, whole-utterance codebook units) plus the overrides of its variant (`VARIANTS`):

  baseline       BEFORE as it is
  fairseq_mask   method.mask_style='fairseq' (fairseq compute_mask_indices, require_same_masks)
  ema_skip_pos_conv  method.ema_skip=('pos_conv',) (DinoSR's ema_layers_only)
  restart_off    method.codebook_restart_patience=0
  eval_windows   method.eval_window_samples=-1 (units on 1 s windows, the training crop);
                 evaluation only: it evaluates the baseline's workdir
  layerdrop      model.layerdrop=0.05                              } when the encoder has the
  deep_pos_conv  model.pos_conv_depth=5, num_conv_pos_embeddings=19 } field (`EncoderConfig`)
  dropout        model.hidden_dropout=attention_dropout=0.1 (base.yaml; 0 in tiny)
  layer_norm_cnn model.feat_extract_norm='layer' (base.yaml extractor_mode layer_norm)
  all            every change above together

`--steps N` sets train.num_steps and the teacher's anneal end (`ema_anneal_end_step`, tiny ties
them) to N (0 = the tiny config's 2,000); `--seeds` sets train.seed and data.seed. Each trained
run has its own workdir OUT/<variant>_s<seed> (the jaxspeech trainer: a finished workdir is
reused, a killed one resumes). Evaluation, on the held-out speakers (split `test`) at the last
layer, as `python -m jaxspeech.evaluate --split test --layer last --k K [--codebook |
--fit_split train]` (`jaxspeech.eval.units`):
  codebook_pnmi   PNMI of the codebook units (the teacher's, as the loss assigns them)
  kmeans_pnmi     PNMI of K-means units of the student's features, fitted on split `train`
  codebook_used   share of the V codewords that label >= 1 held-out frame
  edge_codebook / edge_kmeans  I(unit; d) / H(d), d = frames to the nearer utterance edge capped
                  at 20 (the README's edge measure): 0 = the units ignore the edge
  edge_codebook_window  the same with d to the nearer edge of the evaluation window (windowed
                  units only): the edges the model sees
  speaker_nmi     speaker information in the codebook units
and from training's last logged window: acc_masked, majority_baseline, codebook_used_min
(training batches), masked_fraction, loss; wall_s = the training run's wall time (data,
compilation, steps; kept in WORKDIR/ablation_wall.json for the variants that reuse the run).

Outputs, rewritten after every run so that partial results survive: OUT/results.json (every
record, mean / sample std per variant), OUT/results.md (the table, also printed). A finished
(variant, seed) record OUT/records/<variant>_s<seed>.json is reused as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

PROG = 'python -m benchmarks.dinosr_ablation'
# The tiny recipe before issue 15 (the README's DinoSR rows).
BEFORE = {'method.mask_style': 'exact', 'method.ema_skip': (),
          'method.codebook_restart_patience': 10, 'method.eval_window_samples': 0}
# variant -> overrides of BEFORE ('model.*' ones only when EncoderConfig has the field).
FIXES = {
  'fairseq_mask': {'method.mask_style': 'fairseq'},
  'ema_skip_pos_conv': {'method.ema_skip': ('pos_conv',)},
  'restart_off': {'method.codebook_restart_patience': 0},
  'eval_windows': {'method.eval_window_samples': -1},
  'layerdrop': {'model.layerdrop': 0.05},
  'deep_pos_conv': {'model.pos_conv_depth': 5, 'model.num_conv_pos_embeddings': 19},
  'dropout': {'model.hidden_dropout': 0.1, 'model.attention_dropout': 0.1},
  'layer_norm_cnn': {'model.feat_extract_norm': 'layer'},
}
# Keys that change the evaluation only: a variant differing from another only by these reuses
# that one's training run.
EVAL_ONLY = ('method.eval_window_samples',)
EDGE_CAP = 20  # frames (the README's edge measure)
METRICS = ('codebook_pnmi', 'kmeans_pnmi', 'codebook_used', 'edge_codebook',
           'edge_codebook_window', 'edge_kmeans', 'speaker_nmi', 'acc_masked',
           'majority_baseline', 'codebook_used_min', 'masked_fraction', 'loss', 'wall_s')


def available_fixes() -> dict[str, dict]:
  """FIXES whose model fields exist in this checkout's EncoderConfig."""
  from jaxspeech.models.speech_encoder import EncoderConfig

  fields = {f.name for f in dataclasses.fields(EncoderConfig)}
  return {v: o for v, o in FIXES.items()
          if all(k.split('.', 1)[1] in fields for k in o if k.startswith('model.'))}


def variants() -> dict[str, dict]:
  """variant -> its full overrides of the tiny config (BEFORE + the fix)."""
  fixes = available_fixes()
  out = {'baseline': dict(BEFORE)}
  for v, o in fixes.items():
    out[v] = {**BEFORE, **o}
  out['all'] = {**BEFORE, **{k: x for o in fixes.values() for k, x in o.items()}}
  return out


def run_name(variant: str, overrides: dict, all_variants: dict) -> str:
  """The workdir name of `variant`'s training: the first variant with the same training
  overrides (eval-only keys ignored), so eval_windows evaluates the baseline's run."""
  train = {k: x for k, x in overrides.items() if k not in EVAL_ONLY}
  for v, o in all_variants.items():
    if {k: x for k, x in o.items() if k not in EVAL_ONLY} == train:
      return v
  return variant


def make_config(overrides: dict, seed: int, steps: int):
  from experiments import dinosr

  c = dinosr.get_config('tiny')
  for key, value in overrides.items():
    block, name = key.split('.', 1)
    c[block][name] = value
  c.train.seed = c.data.seed = seed
  if steps:
    c.train.num_steps = steps
    c.method.ema_anneal_end_step = steps
    c.train.log_every = min(int(c.train.log_every), steps)
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), max(steps // 4, 1))
  c.train.checkpoint_every = 0  # the last step only
  return c


def edge_distance(num_frames: int, cap: int = EDGE_CAP, window: int = 0) -> np.ndarray:
  """`[T]` frames to the nearer utterance edge, capped at `cap`; with `window` > 0 frames, to the
  nearer edge of the consecutive window of that many frames holding the frame (the last one
  shorter), the edges an evaluation window shows the model."""
  t = np.arange(num_frames)
  if window <= 0:
    return np.minimum(np.minimum(t, num_frames - 1 - t), cap)
  pos = t % window
  length = np.minimum(window, num_frames - (t // window) * window)
  return np.minimum(np.minimum(pos, length - 1 - pos), cap)


def edge_share(units: list[np.ndarray], window: int = 0) -> float:
  """I(unit; d) / H(d) over all frames of the per-utterance unit arrays (d: `edge_distance`)."""
  from jaxspeech.eval.units import speaker_nmi

  d = np.concatenate([edge_distance(len(u), window=window) for u in units])
  return float(speaker_nmi(d, np.concatenate(units)))


def evaluate_workdir(workdir: str, windows: list[int], k: int) -> dict:
  """K-means numbers (cached in WORKDIR/ablation_kmeans.json) and the codebook numbers of each
  evaluation window (0 = whole utterances, -1 = the training crop) of a trained workdir."""
  from jaxspeech import workdir as workdir_lib
  from jaxspeech.eval import common
  from jaxspeech.eval import units as units_lib

  ctx = workdir_lib.workdir_context(workdir)
  rows = common.task_rows(ctx, '', 'test', need_alignment=True)
  wavs = common.load_wavs(rows)
  layer = common.layer_index(ctx, 'last')
  out = {}
  cache = os.path.join(workdir, f'ablation_kmeans_k{k}.json')
  if os.path.exists(cache):
    with open(cache) as f:
      out.update(json.load(f))
  else:
    fit_wavs = common.load_wavs(common.task_rows(ctx, '', 'train', False))
    r, km = units_lib.evaluate_units(ctx, wavs, rows, layer, k, fit_wavs=fit_wavs,
                                     return_units=True)
    out.update(kmeans_pnmi=r['pnmi'], edge_kmeans=edge_share(km))
    with open(cache, 'w') as f:
      json.dump(out, f)
  from jaxspeech.methods.base import bucket_lengths

  v = int(ctx.config.method.codebook_size)
  for w in windows:
    window = max(bucket_lengths(ctx.config.data)) if w < 0 else w
    wctx = dataclasses.replace(ctx, predict={
      **ctx.predict, 'units': ctx.method.units_fn(ctx.model, ctx.extra, window)})
    r, cb = units_lib.evaluate_units(wctx, wavs, rows, layer, use_units=True, return_units=True)
    frames = ctx.method.enc_cfg.num_frames(window) if window > 0 else 0
    out[w] = {'codebook_pnmi': r['pnmi'], 'speaker_nmi': r.get('speaker_nmi', float('nan')),
              'codebook_used': len(np.unique(np.concatenate(cb))) / v,
              'edge_codebook': edge_share(cb),
              'edge_codebook_window': edge_share(cb, frames) if frames else float('nan'),
              'eval_window_samples': window}
  return out


def run_one(out_dir: str, variant: str, seed: int, steps: int, k: int, all_variants: dict,
            evaluate=evaluate_workdir) -> dict:
  """Trains (or reuses) `variant`'s run for `seed` and evaluates it: one record."""
  from jaxspeech.train import trainer

  record_path = os.path.join(out_dir, 'records', f'{variant}_s{seed}.json')
  if os.path.exists(record_path):
    with open(record_path) as f:
      return json.load(f)
  overrides = all_variants[variant]
  name = run_name(variant, overrides, all_variants)
  workdir = os.path.join(out_dir, f'{name}_s{seed}')
  config = make_config(all_variants[name], seed, steps)  # the training run's own settings
  t = time.perf_counter()
  metrics = trainer.train_and_evaluate(config, workdir)
  wall_path = os.path.join(workdir, 'ablation_wall.json')  # kept for the runs that reuse it
  if os.path.exists(wall_path):
    with open(wall_path) as f:
      wall = json.load(f)['wall_s']
  else:
    wall = round(time.perf_counter() - t, 1)
    with open(wall_path, 'w') as f:
      json.dump({'wall_s': wall}, f)
  window = int(overrides['method.eval_window_samples'])
  ev = evaluate(workdir, [window], k)
  r = {'variant': variant, 'seed': seed, 'workdir': workdir, 'steps': int(config.train.num_steps),
       'overrides': {k_: list(x) if isinstance(x, tuple) else x for k_, x in overrides.items()},
       'wall_s': wall, 'kmeans_pnmi': ev['kmeans_pnmi'], 'edge_kmeans': ev['edge_kmeans'],
       **{k_: x for k_, x in ev[window].items()}}
  for key in ('acc_masked', 'majority_baseline', 'codebook_used_min', 'masked_fraction', 'loss'):
    r[key] = float(metrics.get(key, np.nan))
  os.makedirs(os.path.dirname(record_path), exist_ok=True)
  with open(record_path, 'w') as f:
    json.dump(r, f)
  return r


def summarize(runs: list[dict]) -> dict:
  """{variant: {metric: mean / std / min / max / n over seeds}} in run order."""
  from benchmarks import seed_study

  order = list(dict.fromkeys(r['variant'] for r in runs))
  return seed_study.summarize(runs, order, lambda r: [m for m in METRICS if m in r])


def table(runs: list[dict], summary: dict) -> str:
  def cell(s, digits=3):
    if s is None or not np.isfinite(s['mean']):
      return '-'
    if s['n'] > 1:
      return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"

  seeds = sorted({r['seed'] for r in runs})
  steps = sorted({r['steps'] for r in runs})
  lines = [f'DinoSR tiny ablation (issue 15), steps {steps}, seeds {seeds} (mean ± sample std '
           'when > 1 seed). Held-out speakers, last layer; k-means fitted on the training '
           'speakers; edge = I(unit; frames to the nearer edge, capped at 20) / H(edge).', '',
           '| variant | codebook PNMI | k-means PNMI | codewords used (held-out) | edge share, '
           'codebook / k-means | edge share of the windows, codebook | speaker NMI (codebook) | '
           'acc_masked / majority | masked fraction | wall s |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for v, s in summary.items():
    g = s.get
    lines.append(
      f"| {v} | {cell(g('codebook_pnmi'))} | {cell(g('kmeans_pnmi'))} | "
      f"{cell(g('codebook_used'), 2)} | {cell(g('edge_codebook'))} / {cell(g('edge_kmeans'))} | "
      f"{cell(g('edge_codebook_window'))} | {cell(g('speaker_nmi'))} | "
      f"{cell(g('acc_masked'))} / {cell(g('majority_baseline'))} | "
      f"{cell(g('masked_fraction'))} | {cell(g('wall_s'), 0)} |")
  return '\n'.join(lines) + '\n'


def write_results(out_dir: str, runs: list[dict], args: dict) -> str:
  summary = summarize(runs)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump({'args': args, 'before': {k: list(x) if isinstance(x, tuple) else x
                                        for k, x in BEFORE.items()},
               'runs': runs, 'summary': summary}, f, indent=1)
  md = table(runs, summary)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(md)
  return md


def main(argv=None) -> int:
  from benchmarks.seed_study import run_grid

  all_variants = variants()
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
  p.add_argument('--out', default='runs/dinosr_ablation')
  p.add_argument('--seeds', default='0')
  p.add_argument('--variants', default=','.join(all_variants))
  p.add_argument('--steps', type=int, default=0, help='train.num_steps (0 = the tiny config)')
  p.add_argument('--k', type=int, default=64, help='k-means clusters (the README: 64)')
  a = p.parse_args(argv)
  runs = []

  def run(variant, seed):  # the tables are rewritten after every run (partial results survive)
    runs.append(run_one(a.out, variant, seed, a.steps, a.k, all_variants))
    write_results(a.out, runs, vars(a))
    return runs[-1]

  run_grid(p, a, all_variants, run, show=lambda r: {k: x for k, x in r.items() if k != 'overrides'})
  print(write_results(a.out, runs, vars(a)))
  return 0

if __name__ == '__main__':
  from jaxspeech.errors import run_cli

  sys.exit(run_cli(main, prog=PROG))
