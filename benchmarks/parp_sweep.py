r"""PARP vs OMP / MPI / dense on the built-in corpora, from the tiny pretrained encoder.

    python -m benchmarks.parp_sweep --out runs/parp_sweep --pretrained runs/hubert_tiny \
        [--corpora synth,fsdd] [--sparsities 0.5,0.7,0.9] [--steps 400] [--bench-only]

Corpora:
  synth  phone CTC on the built-in synthetic corpus (train split; PER on the held-out speakers
         `us2_high`, `en1_high`, split `test`), whole utterances (3.75 s windows).
  fsdd   digit-word (character) CTC on FSDD, one speaker held out (`--fsdd-test-speaker`,
         default theo): WER and CER on all of that speaker's 500 recordings; 1 s windows (the
         few longer training recordings are left out of the loss).
Runs: one dense fine-tuning per corpus (it is also OMP's first phase, shared by the OMP runs),
then per sparsity OMP (second phase, rewound to the pretrained weights), MPI and PARP, each for
`--steps` updates: OMP costs two fine-tuning runs, MPI and PARP one. Results go to
OUT/results.jsonl (one line per run, appended as they finish) and a markdown table on stdout.

`--bench-only` times a PARP re-prune (masks of every prunable tensor + mask application,
jitted) against a train step of the same tiny model and batch.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDD_ROOT = os.path.join(REPO, '..', 'shared', 'data', 'fsdd', 'recordings')


def fsdd_manifest(out_dir: str, test_speaker: str) -> str:
  from data_pipelines.manifest import build_manifest, write_manifest

  path = os.path.join(out_dir, f'fsdd_heldout_{test_speaker}.jsonl')
  if not os.path.exists(path):
    rows, _ = build_manifest(FSDD_ROOT, 'fsdd')
    if test_speaker not in {r['speaker'] for r in rows}:
      raise ValueError(f'--fsdd-test-speaker {test_speaker!r} is not an FSDD speaker')
    for r in rows:
      r['split'] = 'test' if r['speaker'] == test_speaker else 'train'
    write_manifest(path, rows)
  return path


def corpus_config(corpus: str, out_dir: str, pretrained: str, steps: int, args):
  from experiments import parp

  c = parp.get_config('tiny')
  c.init_from = os.path.abspath(pretrained) if pretrained else ''
  c.train.num_steps = steps
  c.train.log_every = max(steps // 8, 1)
  c.train.checkpoint_every = steps
  c.optim.warmup_steps = max(steps // 10, 1)
  c.method.freeze_encoder_steps = steps // 4  # the head learns first (experiments/ctc.py)
  c.prune.every = args.every
  if corpus == 'fsdd':
    c.data.manifest = fsdd_manifest(out_dir, args.fsdd_test_speaker)
    c.data.num_samples = 16_000
    c.method.unit = 'char'
    manifest = c.data.manifest
  else:
    from data_pipelines.synth import built_in_corpus
    manifest = built_in_corpus(num_utterances=int(c.data.builtin_utterances))
  return c, manifest


def run_one(config, workdir: str, manifest: str, method: str, sparsity: float,
            dense_dir: str | None) -> dict:
  import copy

  from jaxspeech import prune as prune_runner
  from jaxspeech.workdir import evaluate_ctc

  c = copy.deepcopy(config)
  c.prune.method = method
  c.prune.sparsity = sparsity
  if method == 'omp' and dense_dir:
    # OMP's first phase is the dense run: share it.
    os.makedirs(os.path.join(workdir, 'phases'), exist_ok=True)
    link = os.path.join(workdir, 'phases', 'dense')
    if not os.path.exists(link):
      os.symlink(os.path.abspath(dense_dir), link)
  t0 = time.time()
  out = prune_runner.run(c, workdir)
  train_s = time.time() - t0
  scores = evaluate_ctc(workdir, manifest, split='test')
  sp = out['sparsity']
  tensors = [v for k, v in sp.items() if k != 'global']
  return {'method': method, 'target_sparsity': sparsity, 'measured_global': sp['global'],
          'measured_min': min(tensors), 'measured_max': max(tensors),
          'fine_tuning_runs': len(out['phases']), 'updates_each': int(c.train.num_steps),
          'final_train_ctc_loss': out['phases'][-1]['metrics'].get('ctc_loss'),
          'seconds': round(train_s, 1), **scores}


def bench_reprune(repeats: int = 5) -> dict:
  """Median seconds of a jitted train step vs a jitted re-prune of the same tiny model."""
  import jax

  from experiments import parp
  from jaxspeech.methods.base import get_method
  from jaxspeech.ops import pruning
  from jaxspeech.train import data as data_lib
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  c = parp.get_config('tiny')
  c.prune.every = 10 ** 6  # no re-prune inside the timed train steps
  c.train.num_steps = 10 ** 7
  method = get_method(c)
  mesh = partitioning.create_mesh(c.mesh, devices=jax.devices()[:1])
  setup = step_lib.build_setup(c, method, mesh)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  batch = data_lib.to_global(next(data_lib.make_iterator(c, mesh)), mesh)
  step = step_lib.jit_train_step(setup, batch)
  state, _ = step(state, batch)  # compile + the pruning step
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  spec = method.prune

  @jax.jit
  def reprune(params):
    masks = spec.masks(params)
    return pruning.apply_masks(params, masks), masks

  jax.block_until_ready(reprune(state['params']))
  ptimes = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(reprune(state['params']))
    ptimes.append(time.perf_counter() - t)
  sel = jax.tree.leaves(pruning.prunable_selection(state['params'], spec.pattern))
  n_pruned = sum(int(np.prod(x.shape)) for x, s in zip(jax.tree.leaves(state['params']), sel)
                 if s)
  ts, tp = float(np.median(times)), float(np.median(ptimes))
  return {'train_step_s': ts, 'reprune_s': tp, 'reprune_over_step': tp / ts,
          'prunable_params': n_pruned, 'device': str(jax.devices()[0]),
          'batch': f"{int(c.data.batch_size)} x {int(c.data.num_samples)} samples"}


def table(rows: list[dict]) -> str:
  lines = ['| corpus | method | sparsity | measured | runs x updates | PER | WER | CER |',
           '|---|---|---|---|---|---|---|---|']
  def f(r, k):
    return f"{100 * r[k]:.1f}" if k in r else '-'

  for r in rows:
    lines.append(f"| {r['corpus']} | {r['method']} | {r['target_sparsity']:.0%} | "
                 f"{r['measured_global']:.4f} | {r['fine_tuning_runs']} x {r['updates_each']} | "
                 f"{f(r, 'per')} | {f(r, 'wer')} | {f(r, 'cer')} |")
  return '\n'.join(lines)


def main():
  from absl import logging
  p = argparse.ArgumentParser()
  p.add_argument('--out', default='runs/parp_sweep')
  p.add_argument('--pretrained', default='runs/hubert_tiny')
  p.add_argument('--corpora', default='synth,fsdd')
  p.add_argument('--methods', default='dense,omp,mpi,parp')
  p.add_argument('--sparsities', default='0.5,0.7,0.9')
  p.add_argument('--steps', type=int, default=400)
  p.add_argument('--every', type=int, default=50, help='PARP re-prune interval (updates)')
  p.add_argument('--fsdd-test-speaker', default='theo')
  p.add_argument('--bench-only', action='store_true')
  args = p.parse_args()
  logging.set_verbosity(logging.WARNING)
  if args.bench_only:
    print(json.dumps(bench_reprune()))
    return
  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, 'results.jsonl')
  done = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      for line in f:
        r = json.loads(line)
        done[(r['corpus'], r['method'], r['target_sparsity'])] = r
  methods = args.methods.split(',')
  sparsities = [float(s) for s in args.sparsities.split(',')]
  for corpus in args.corpora.split(','):
    config, manifest = corpus_config(corpus, args.out, args.pretrained, args.steps, args)
    dense_dir = os.path.join(args.out, corpus, 'dense')
    jobs = [('none', 0.0, dense_dir)] if 'dense' in methods else []
    jobs += [(m, s, os.path.join(args.out, corpus, f'{m}_{int(round(100 * s))}'))
             for s in sparsities for m in methods if m != 'dense']
    for method, s, workdir in jobs:
      key = (corpus, 'dense' if method == 'none' else method, s)
      if key in done:
        continue
      r = run_one(config, workdir, manifest, method, s,
                  dense_dir if os.path.isdir(os.path.join(dense_dir, 'checkpoints')) else None)
      r.update(corpus=corpus, method=key[1], workdir=workdir)
      done[key] = r
      with open(results_path, 'a') as f:
        f.write(json.dumps(r) + '\n')
      print(json.dumps(r), flush=True)
  print(table(list(done.values())))


if __name__ == '__main__':
  main()
