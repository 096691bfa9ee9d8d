r"""wav2vec-U 2.0 end to end: raw audio + unpaired text -> unsupervised phone recogniser -> PER.

    python -m jaxspeech.w2vu run --workdir runs/w2vu [--encoder DIR] [--seeds 0,1,2,3,4]
    python -m jaxspeech.w2vu features --encoder DIR|mfcc --layer L --out DIR [--manifest M]

`run` stages (each reused when a previous run finished it):
  1. corpus      the built-in synthetic corpus (8 speakers, exact alignments; `us2_high` and
                 `en1_high` held out as split "test").
  2. encoder     `--encoder` (an HF folder or a jaxspeech workdir), or the tiny HuBERT-style
                 encoder pretrained here (`experiments/hubert.py:tiny`, 1,000 steps) in
                 WORKDIR/pretrain.
  3. features    its layer `--layer` for every utterance, cached once (`data_pipelines.features`,
                 with the 64-cluster MFCC k-means targets), and the MFCC cache (the ablation).
  4. text        `--text-sentences` sentences of the built-in grammar with seed `--text-seed`
                 (the audio's transcripts are seed 0), phonemised by espeak-ng, silence as the
                 audio has it (`--surround end --sil-prob 0`: the synthetic speech starts at
                 once and ends in silence; fairseq's default is both ends and p=0.5), every
                 sentence equal to an audio transcript removed (`python -m
                 data_pipelines.text`); the overlap count is reported.
  5. train       `experiments/w2vu2.py:tiny` for every seed on the encoder features and on the
                 MFCCs (the training speakers' audio, no transcript), and the supervised CTC
                 reference (the same generator, true phones) on each input.
  6. evaluate    PER on the held-out speakers (`per` task), the unsupervised selection metric on
                 the training audio (`lm_selection`), baselines (the majority phone; random
                 phone sequences from the text's phone LM), the seed picked by the metric, and
                 the Spearman rank correlation between the metric and PER over seeds.
WORKDIR/results.json and WORKDIR/results.md hold the table.

User errors (a bad flag or `--set` override, a missing encoder or manifest, a bad audio file...)
print one line `PROG: error: ...` naming the flag or file and exit with code 2
(`jaxspeech.errors.run_cli`); the flags of `run` are checked before any stage starts. Only a bug
shows a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging as logging_std
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import logging

from jaxspeech import demo, errors

PROG = 'python -m jaxspeech.w2vu'
FIT_SPLIT, EVAL_SPLIT = 'train', 'test'
INPUTS = ('ssl', 'mfcc', 'oracle')


class StudyError(errors.UserError, ValueError):
  """A flag of the study that cannot be used; the message names it."""


class OverrideKeyError(errors.UserError, KeyError):
  """`--set KEY=VALUE` names a field the config does not have."""

  def __str__(self):  # KeyError would quote the message
    return str(self.args[0]) if self.args else ''


# ---------------------------------------------------------------------------------------------
# Feature caches.


def cache_features(encoder: str, layer: str, out_dir: str, manifest: str = '',
                   batch_size: int = 8) -> str:
  """The feature cache of `encoder` ('mfcc', an HF folder or a jaxspeech workdir) at layer
  `layer` for the rows of `manifest` ('' = the built-in corpus); returns its manifest path."""
  from data_pipelines import features as feature_cache
  from data_pipelines import synth
  from data_pipelines.manifest import read_manifest
  from jaxspeech import workdir as workdir_lib
  from jaxspeech.audio import load_audio
  from jaxspeech.eval import common
  from jaxspeech.methods.w2vu2 import utterance_mfccs

  manifest = os.path.abspath(manifest or synth.built_in_corpus())
  source = encoder if encoder in ('mfcc', 'oracle') else os.path.abspath(encoder)
  # mfcc_input_scale: the MFCCs (features and auxiliary targets) of caches made before Dec 2
  # saw the waveform x 32768; those caches are rebuilt.
  meta = {'source': source, 'layer': str(layer), 'corpus': manifest, 'mfcc_input_scale': 'fairseq'}
  if feature_cache.cache_is_complete(out_dir, meta):
    logging.info('reusing the feature cache %s', out_dir)
    return os.path.join(out_dir, 'manifest.jsonl')
  rows = read_manifest(manifest)
  t0 = time.perf_counter()
  wavs = [load_audio(r['path']) for r in rows]
  mfccs = utterance_mfccs(wavs)
  if encoder == 'mfcc':
    feats = mfccs
  elif encoder == 'oracle':
    feats = oracle_features(rows, [len(m) for m in mfccs])
  else:
    ctx = workdir_lib.load_context(encoder, label=f'--encoder {encoder}')
    feats = common.layer_outputs(ctx, wavs, common.layer_index(ctx, layer), batch_size)
  out = feature_cache.write_feature_cache(out_dir, rows, feats, mfccs, meta=meta)
  logging.info('features of %d utterances (%s, layer %s) + MFCC k-means targets in %.0f s',
               len(rows), source, layer, time.perf_counter() - t0)
  return out


def oracle_features(rows: list[dict], frames: Sequence[int], noise: float = 0.3,
                    seed: int = 0) -> list[np.ndarray]:
  """A sanity input, not speech features: each 50 Hz frame's true phone (from the row's
  alignment) as a one-hot over `US_PHONES` plus N(0, noise^2) noise, [T_i, 42]. A GAN that
  cannot learn the phone mapping from these has a bug; one that can, but not from an encoder's
  features, is limited by the features (or the budget)."""
  from data_pipelines import phones

  inv = {p: i for i, p in enumerate(phones.US_PHONES)}
  rng = np.random.default_rng(seed)
  out = []
  for r, t in zip(rows, frames):
    lab = np.maximum(phones.frame_labels(r['alignment'], t, 50, inv), 0)
    x = np.eye(len(inv), dtype=np.float32)[lab]
    out.append(x + noise * rng.standard_normal(x.shape).astype(np.float32))
  return out


# ---------------------------------------------------------------------------------------------
# Baselines.


def baselines(corpus_rows: list[dict], lm, seed: int = 0) -> dict[str, float]:
  """PER on the held-out rows of (a) the most frequent phone of the text, one per reference
  phone (PER = 1 - its share), and (b) a random phone sequence sampled from the text's phone LM
  for every utterance (silence dropped)."""
  from jaxspeech.eval.asr import error_rate
  from jaxspeech.methods.w2vu2 import SILENCE, reference_phones

  rows = [r for r in corpus_rows if r.get('split') == EVAL_SPLIT]
  refs = [reference_phones(r) for r in rows]
  counts = lm.unigram_counts() if hasattr(lm, 'unigram_counts') else None
  if counts is None:
    samples = lm.sample(np.random.default_rng(seed), 2000)
    counts = {}
    for s in samples:
      for p in s:
        counts[p] = counts.get(p, 0) + 1
  majority = max((p for p in counts if p != SILENCE), key=counts.get)
  per_majority = error_rate(refs, [[majority] * len(r) for r in refs])
  hyps = [[p for p in s if p != SILENCE] for s in lm.sample(np.random.default_rng(seed), len(refs))]
  return {'majority_phone': majority, 'per_majority_phone': per_majority,
          'per_lm_random': error_rate(refs, hyps)}


# ---------------------------------------------------------------------------------------------
# The study.


def _train_eval(config, workdir: str) -> dict[str, float]:
  from jaxspeech import workdir as workdir_lib
  from jaxspeech.eval import registry

  t0 = time.perf_counter()
  demo.train(config, workdir)
  wall = time.perf_counter() - t0
  ctx = workdir_lib.load_context(workdir, label=f'the study run {workdir}')
  out = {'per': registry.run_task(ctx, 'per', split=EVAL_SPLIT)['per'], 'train_seconds': wall}
  if not bool(config.method.supervised):
    out.update(registry.run_task(ctx, 'lm_selection', split=FIT_SPLIT))
  out['nonfinite'] = _nonfinite_steps(workdir)
  return out


def _nonfinite_steps(workdir: str) -> int:
  """Logged metric lines of the run with a non-finite value (the trainer stops on the first)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  bad = 0
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      bad += any(isinstance(v, float) and not np.isfinite(v) for v in row.values())
  return bad


def apply_overrides(config, items: Sequence[str]) -> None:
  """`key=value` strings onto a locked ConfigDict; the value is parsed as the field's type and
  set with `ConfigDict.update_from_flattened_dict`."""
  flat = {}
  for item in items:
    key, sep, raw = item.partition('=')
    if not sep:
      raise StudyError(f'--set {item!r}: expected KEY=VALUE')
    try:
      old = functools.reduce(lambda node, k: node[k], key.split('.'), config)
    except (KeyError, TypeError, AttributeError):
      raise OverrideKeyError(f'--set {item!r}: config has no field {key!r}') from None
    if isinstance(old, bool):
      if raw.lower() not in ('true', 'false', '1', '0'):
        raise StudyError(f'--set {item!r}: {key} is a bool')
      flat[key] = raw.lower() in ('true', '1')
    else:
      try:
        flat[key] = type(old)(raw)
      except (TypeError, ValueError):
        raise StudyError(f'--set {item!r}: {key} is a {type(old).__name__}') from None
  config.update_from_flattened_dict(flat)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  from scipy.stats import spearmanr

  return float(spearmanr(a, b).statistic)


def check_args(args) -> list[int]:
  """The flags of `run`, checked before any stage starts (StudyError naming the flag); returns
  the seeds."""
  try:
    seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  except ValueError:
    raise StudyError(f'--seeds {args.seeds!r}: expected comma-separated integers') from None
  if not seeds:
    raise StudyError('--seeds: no seed')
  names = [n for n in args.inputs.split(',') if n.strip()]
  unknown = [n for n in names if n not in INPUTS]
  if unknown or not names:
    raise StudyError(f'--inputs {args.inputs!r}: unknown input(s) {unknown} (choose from '
                     f'{", ".join(INPUTS)})')
  if args.encoder and not os.path.exists(args.encoder):
    raise StudyError(f'--encoder {args.encoder}: no such directory')
  for flag in ('steps', 'batch_size', 'eval_every', 'pretrain_steps', 'text_sentences'):
    if getattr(args, flag) < 0:
      raise StudyError(f'--{flag.replace("_", "-")} {getattr(args, flag)}: must be >= 0')
  if not 0.0 <= args.sil_prob <= 1.0:
    raise StudyError(f'--sil-prob {args.sil_prob}: must be in [0, 1]')
  apply_overrides(demo.experiment_config('w2vu2', 'tiny'), args.set)  # a bad --set fails now
  return seeds


def run(args) -> dict:
  from data_pipelines import synth, text
  from data_pipelines.manifest import read_manifest
  from jaxspeech.eval.lm_selection import lm_path
  from jaxspeech.eval.phone_lm import PhoneLM

  seeds = check_args(args)
  t_start = time.perf_counter()
  wd = os.path.abspath(args.workdir)
  if os.path.exists(wd) and not os.path.isdir(wd):
    raise StudyError(f'--workdir {args.workdir}: is a file')
  os.makedirs(wd, exist_ok=True)
  corpus = synth.built_in_corpus()
  corpus_rows = read_manifest(corpus)

  encoder = args.encoder
  if not encoder and 'ssl' in args.inputs.split(','):
    encoder = os.path.join(wd, 'pretrain')
    c = demo.experiment_config('hubert', 'tiny')
    c.train.num_steps = args.pretrain_steps
    demo.train(c, encoder)
  feats = {}
  for name in [n for n in args.inputs.split(',') if n.strip()]:
    src, layer = (encoder, args.layer) if name == 'ssl' else (name, '0')
    feats[name] = cache_features(src, layer, os.path.join(wd, f'features_{name}'))
  timing = {'until_features_seconds': time.perf_counter() - t_start}

  text_path = os.path.join(wd, 'text', f'text-{args.text_sentences}-seed{args.text_seed}-sil'
                           f'{args.sil_prob:g}-{args.surround}.jsonl')
  if not os.path.exists(text_path):
    text.write_text_manifest(text_path, synth.generate_sentences(args.text_sentences,
                                                                 args.text_seed),
                             sil_prob=args.sil_prob, seed=args.text_seed,
                             exclude_manifest=corpus, surround=args.surround)
  with open(os.path.splitext(text_path)[0] + '.stats.json') as f:
    text_stats = json.load(f)
  lm = PhoneLM.load(lm_path(text_path))
  base = baselines(corpus_rows, lm)

  results = {'seeds': seeds, 'encoder': encoder, 'layer': args.layer, 'text': text_stats,
             'baselines': base, 'runs': {}}
  for name, manifest in feats.items():
    with open(os.path.join(os.path.dirname(manifest), 'meta.json')) as f:
      dim = json.load(f)['dim']
    for seed in seeds + ['supervised']:
      c = demo.experiment_config('w2vu2', 'tiny')
      c.data.manifest = manifest
      c.method.input_dim = dim
      c.method.features = name
      c.method.text_manifest = text_path
      if args.steps:
        c.train.num_steps = args.steps
      if args.batch_size:
        c.data.batch_size = args.batch_size
      if args.eval_every:
        c.evals.per.every = c.evals.selection.every = args.eval_every
      apply_overrides(c, args.set)
      if seed == 'supervised':
        c.method.supervised = True
        c.evals = {}  # no selection metric without a discriminator; PER below
      else:
        c.train.seed = seed
      key = f'{name}/{"supervised" if seed == "supervised" else f"seed{seed}"}'
      logging.info('[w2vu] training %s', key)
      results['runs'][key] = _train_eval(c, os.path.join(wd, name, key.split('/')[1]))
      logging.info('[w2vu] %s: %s', key, results['runs'][key])
      _write(wd, results, t_start, timing)
  return _write(wd, results, t_start, timing)


def _summary(results: dict) -> dict:
  out = {}
  for name in ('ssl', 'mfcc', 'oracle'):
    runs = [results['runs'].get(f'{name}/seed{s}') for s in results['seeds']]
    runs = [r for r in runs if r]
    if not runs:
      continue
    per = [r['per'] for r in runs]
    metric = [r['weighted_lm_ppl'] for r in runs]
    pick = int(np.argmin(metric))
    out[name] = {'per_mean': float(np.mean(per)), 'per_min': float(np.min(per)),
                 'per_max': float(np.max(per)), 'selected_seed': results['seeds'][pick],
                 'per_selected': per[pick],
                 'spearman_metric_per': spearman(metric, per) if len(runs) > 2 else None,
                 'nonfinite_runs': sum(r['nonfinite'] > 0 for r in runs)}
    sup = results['runs'].get(f'{name}/supervised')
    if sup:
      out[name]['per_supervised'] = sup['per']
  return out


def _write(wd: str, results: dict, t_start: float, timing: dict) -> dict:
  results['summary'] = _summary(results)
  results['timing'] = {**timing, 'wall_seconds': time.perf_counter() - t_start}
  with open(os.path.join(wd, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(wd, 'results.md'), 'w') as f:
    f.write(format_table(results) + '\n')
  return results


def format_table(results: dict) -> str:
  b = results['baselines']
  lines = ['| input | run | PER (test speakers) | weighted LM ppl (train audio) | LM ppl | '
           'vocab used | train s |', '|---|---|---|---|---|---|---|']
  for key, r in results['runs'].items():
    name, run_name = key.split('/')
    sel = (f"{r['weighted_lm_ppl']:.1f} | {r['lm_ppl']:.1f} | {r['vocab_seen']:.2f}"
           if 'weighted_lm_ppl' in r else '- | - | -')
    lines.append(f"| {name} | {run_name} | {100 * r['per']:.1f}% | {sel} | "
                 f"{r['train_seconds']:.0f} |")
  lines.append(f"| - | majority phone ({b['majority_phone']}) | "
               f"{100 * b['per_majority_phone']:.1f}% | | | | |")
  lines.append(f"| - | random phones from the text LM | {100 * b['per_lm_random']:.1f}% "
               "| | | | |")
  for name, s in results.get('summary', {}).items():
    rho = s['spearman_metric_per']
    lines.append(f"\n{name}: PER mean {100 * s['per_mean']:.1f}% (min {100 * s['per_min']:.1f}, "
                 f"max {100 * s['per_max']:.1f}); selected seed {s['selected_seed']} -> "
                 f"{100 * s['per_selected']:.1f}%; Spearman(metric, PER) = "
                 f"{'n/a' if rho is None else f'{rho:.2f}'}; supervised "
                 f"{100 * s.get('per_supervised', float('nan')):.1f}%; runs with NaN: "
                 f"{s['nonfinite_runs']}")
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns its exit code (0, or 2 after one `error:` line for a user error;
  argparse exits 2 itself for a bad flag)."""
  return errors.run_cli(_main, argv, prog=PROG)


def _main(argv: Sequence[str] | None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  f = sub.add_parser('features', help='cache the features of an encoder layer (or MFCC)')
  f.add_argument('--encoder', required=True, help="HF folder, jaxspeech workdir, or 'mfcc'")
  f.add_argument('--layer', default='last', help="hidden-state index or 'last'")
  f.add_argument('--manifest', default='', help="audio manifest ('' = the built-in corpus)")
  f.add_argument('--out', required=True)
  r = sub.add_parser('run', help='the whole study (see the module docstring)')
  r.add_argument('--workdir', default='runs/w2vu')
  r.add_argument('--encoder', default='', help="HF folder or workdir ('' = pretrain tiny here)")
  r.add_argument('--layer', default='last')
  r.add_argument('--seeds', default='0,1,2,3,4')
  r.add_argument('--steps', type=int, default=0, help='GAN steps (0 = the tiny config)')
  r.add_argument('--inputs', default='ssl,mfcc',
                 help="comma list of ssl (the encoder's layer), mfcc, oracle (noisy true phones)")
  r.add_argument('--batch-size', type=int, default=0, help='0 = the tiny config')
  r.add_argument('--eval-every', type=int, default=0, help='0 = the tiny config')
  r.add_argument('--pretrain-steps', type=int, default=1000)
  r.add_argument('--text-sentences', type=int, default=2000)
  r.add_argument('--text-seed', type=int, default=1)
  r.add_argument('--sil-prob', type=float, default=0.0,
                 help='silence between words (the built-in audio has none: 0; fairseq 0.5)')
  r.add_argument('--surround', default='end', choices=('both', 'end', 'none'),
                 help="silence at the text's ends (built-in audio: only at the end)")
  r.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='override a field of experiments/w2vu2.py:tiny for every GAN run '
                      '(e.g. method.code_penalty=0); repeatable')
  args = p.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_Quiet())
  if args.command == 'features':
    print(cache_features(args.encoder, args.layer, args.out, args.manifest))
    return 0
  results = run(args)
  print(format_table(results), flush=True)
  return 0


class _Quiet(logging_std.Filter):
  def filter(self, record):
    return record.levelno >= logging_std.WARNING or 'orbax' not in record.pathname


if __name__ == '__main__':
  sys.exit(main())
