"""Shared pieces of the multi-seed studies (`uavm_study.py`, `cmcm_study.py`): one reusable
training run per (variant, seed) with its record, and mean ± spread over seeds."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable

import numpy as np


def run_record(out_dir: str, variant: str, seed: int, config,
               extra: Callable[[str, dict], dict] | None = None) -> dict:
  """Trains `config` in OUT_DIR/<variant>_s<seed> (a finished run is reused as it is: the trainer
  refuses a changed config, else has nothing to do) and returns its record: variant, seed,
  workdir, wall_s, every `eval/test/*` metric without the prefix, train_loss, plus
  `extra(workdir, metrics)`; the record is kept in WORKDIR/study_run.json."""
  from jaxspeech.train import trainer

  workdir = os.path.join(out_dir, f'{variant}_s{seed}')
  record = os.path.join(workdir, 'study_run.json')
  if os.path.exists(record):
    trainer.train_and_evaluate(config, workdir)
    with open(record) as f:
      return json.load(f)
  t = time.perf_counter()
  metrics = trainer.train_and_evaluate(config, workdir)
  r = {'variant': variant, 'seed': seed, 'workdir': workdir,
       'wall_s': round(time.perf_counter() - t, 1)}
  for k, v in metrics.items():
    if k.startswith('eval/test/'):
      r[k.removeprefix('eval/test/')] = float(v)
  r['train_loss'] = float(metrics.get('loss', np.nan))
  if extra is not None:
    r.update(extra(workdir, metrics))
  with open(record, 'w') as f:
    json.dump(r, f)
  return r


def spread(values: Iterable[float]) -> dict:
  """{mean, std (sample, 0 for one value), min, max, n} of the values."""
  x = np.asarray(list(values), np.float64)
  return {'mean': float(x.mean()), 'std': float(x.std(ddof=1)) if len(x) > 1 else 0.0,
          'min': float(x.min()), 'max': float(x.max()), 'n': int(len(x))}


def summarize(runs: list[dict], variants: Iterable[str],
              keys: Callable[[dict], Iterable[str]]) -> dict:
  """{variant: {key: spread over the variant's runs}} for `keys(first run of the variant)`."""
  out = {}
  for v in variants:
    rs = [r for r in runs if r['variant'] == v]
    if rs:
      out[v] = {k: spread(r[k] for r in rs) for k in keys(rs[0])}
  return out


def run_grid(parser, args, variants_all, run: Callable[[str, int], dict],
             show: Callable[[dict], dict] = lambda r: r) -> list[dict]:
  """Every (seed, variant) of `args.seeds` / `args.variants` (comma lists; an unknown variant is
  `parser.error`) through `run(variant, seed)`, each record printed as it comes (`show`)."""
  from absl import logging

  variants = args.variants.split(',')
  bad = sorted(set(variants) - set(variants_all))
  if bad:
    parser.error(f'--variants: unknown {bad} (of {tuple(variants_all)})')
  logging.set_verbosity(logging.WARNING)
  os.makedirs(args.out, exist_ok=True)
  runs = []
  for seed in (int(x) for x in args.seeds.split(',')):
    for v in variants:
      runs.append(run(v, seed))
      print(json.dumps(show(runs[-1])), flush=True)
  return runs
