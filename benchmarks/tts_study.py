r"""TTS quality and magnitude-pruning sweep of the acoustic model (issue 17's must-show).

    python -m benchmarks.tts_study --dense runs/tts_tiny --judge runs/judge_tiny \
        [--vocoder runs/vocoder_tiny] --out runs/tts_study [--sparsities 0.3,0.5,0.7,0.9] \
        [--steps 300] [--augment 300] [--num 40]

Rows (each `evaluate --task tts` on the same `--num` unseen sentences of voice `--speaker`):
  dense, Griffin-Lim and (with `--vocoder`) the learned vocoder;
  for each sparsity s: one-shot magnitude pruning of the dense model (`prune.method=mpi` from
  `init_from=--dense`: the masks are MP of the trained weights) + `--steps` fine-tuning updates
  with the masks fixed (`experiments/tts.py:finetune`), on
    original   the dense model's training rows, and
    augmented  those plus `--augment` utterances the dense model speaks for unseen grammar
               sentences (training voices in turn; `jaxspeech.synthesize.speak_manifest`, waveform
               by the same vocoder / Griffin-Lim) -- the paper's TTS-augmentation;
  s = 0 fine-tunes the dense model for the same updates (the control);
  with `--vocoder-sparsities`, the same for the vocoder's generator (`vocoder_sXX`: one-shot MP
  of the trained generator + `--steps` GAN updates with fixed masks), speaking for the dense
  acoustic model.
Results: OUT/results.jsonl (appended as runs finish; a re-run skips finished rows), OUT/table.md,
OUT/pruning.png (judge PER, MCD, F0 RMSE against sparsity), and WAV samples under OUT/samples/.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from absl import logging

METRICS = ('judge_per', 'judge_per_reference', 'judge_per_shuffled', 'mcd_db', 'f0_rmse_hz',
           'vuv_error', 'energy_rmse_db', 'duration_ratio', 'phone_duration_mae_ms')


def _done(path: str) -> dict[str, dict]:
  if not os.path.exists(path):
    return {}
  return {r['name']: r for r in map(json.loads, open(path))}


def _evaluate(workdir, args, name, vocoder, out):
  from jaxspeech import evaluate

  t0 = time.time()
  m = evaluate.evaluate(workdir, '', 'tts', judge=args.judge, vocoder=vocoder,
                        speaker=args.speaker, num=args.num,
                        out=os.path.join(out, 'samples', name))
  return {**m, 'eval_seconds': round(time.time() - t0, 1)}


def augmented_manifest(args, vocoder) -> str:
  """Training rows of the dense model + `--augment` utterances it speaks (unseen sentences)."""
  from data_pipelines.manifest import read_manifest, write_manifest
  from data_pipelines.synth import generate_sentences
  from jaxspeech.synthesize import speak_manifest
  from jaxspeech.workdir import load_context

  path = os.path.join(args.out, 'augmented', 'train_plus_tts.jsonl')
  if os.path.exists(path):
    return path
  ctx = load_context(args.dense)
  train = ctx.rows(split='train')
  seen = {str(r.get('text', '')).strip().lower() for r in ctx.rows(split='')}
  # Disjoint from the evaluation sentences too (eval.tts draws with seeds 1000+; these 900000+).
  from data_pipelines.synth import held_out_corpus

  evald = read_manifest(held_out_corpus(args.speaker, args.num, seed=1, exclude=seen,
                                        cache_dir=str(ctx.config.data.cache_dir) or None))
  seen |= {r['text'].strip().lower() for r in evald}
  texts = []
  for s in generate_sentences(4 * args.augment, 900_001):
    if s.strip().lower() not in seen and len(texts) < args.augment:
      seen.add(s.strip().lower())
      texts.append(s)
  speakers = [ctx.method.speakers[i % len(ctx.method.speakers)] for i in range(len(texts))]
  voc = load_context(vocoder) if vocoder else None
  tts_rows = read_manifest(speak_manifest(ctx, texts, speakers,
                                          os.path.join(args.out, 'augmented'), voc))
  write_manifest(path, [dict(r, path=os.path.abspath(r['path'])) for r in train] + tts_rows)
  return path


def _pruned_finetune(c, dense: str, sparsity: float, steps: int, wd: str) -> str:
  """Config `c` (unlocked) from the dense workdir: one-shot magnitude pruning at `sparsity`
  (`prune.method=mpi`; 0 = dense control) + `steps` updates with the masks fixed, in `wd`."""
  from jaxspeech.train import trainer

  c.init_from = os.path.abspath(dense)
  c.prune.method = 'mpi' if sparsity > 0 else 'none'
  c.prune.sparsity = float(sparsity)
  c.train.num_steps = steps
  c.train.checkpoint_every = steps
  c.lock()
  trainer.train_and_evaluate(c, wd)
  return wd


def finetune(args, sparsity: float, data: str, manifest: str) -> str:
  from experiments import tts

  wd = os.path.join(args.out, f's{int(round(sparsity * 100)):02d}_{data}')
  c = tts.get_config('finetune')
  dense_cfg = json.load(open(os.path.join(args.dense, 'config.json')))
  c.unlock()
  for k in ('max_phones', 'dim', 'heads', 'ffn_dim', 'ffn_kernel', 'encoder_layers',
            'decoder_layers', 'predictor_dim', 'dropout'):
    c.method[k] = dense_cfg['method'][k]
  c.data.builtin_utterances = dense_cfg['data']['builtin_utterances']
  c.data.manifest = manifest if data == 'augmented' else dense_cfg['data']['manifest']
  return _pruned_finetune(c, args.dense, sparsity, args.steps, wd)


def finetune_vocoder(args, sparsity: float) -> str:
  """One-shot magnitude pruning of the trained vocoder's generator (`--vocoder`) + GAN
  fine-tuning with the masks fixed for `--steps` updates (s = 0: the dense control)."""
  from experiments import vocoder

  wd = os.path.join(args.out, f'vocoder_s{int(round(sparsity * 100)):02d}')
  c = vocoder.get_config('tiny')
  dense_cfg = json.load(open(os.path.join(args.vocoder, 'config.json')))
  c.unlock()
  c.method.update(dense_cfg['method'])
  c.method.adv_start_step = 0  # the dense run's warm-up is over
  return _pruned_finetune(c, args.vocoder, sparsity, args.steps, wd)


def plot(rows: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for ax, (key, label) in zip(axes, (('judge_per', 'judge PER (%)'), ('mcd_db', 'MCD (dB)'),
                                      ('f0_rmse_hz', 'F0 RMSE (Hz)'))):
    scale = 100.0 if key == 'judge_per' else 1.0
    for data, style in (('original', 'o-'), ('augmented', 's--'), ('vocoder', 'd:')):
      pts = sorted((r['sparsity'], r[key]) for r in rows if r.get('data') == data)
      if pts:
        ax.plot([100 * s for s, _ in pts], [scale * v for _, v in pts], style, label=data)
    for name, color, line in (('dense_griffin_lim', 'grey', 'dense, Griffin-Lim'),
                              ('dense_vocoder', 'purple', 'dense, vocoder')):
      dense = [r for r in rows if r['name'] == name]
      if name == 'dense_vocoder' and not any(r.get('data') == 'vocoder' for r in rows):
        continue  # the vocoder's reference line belongs to the vocoder sweep only
      if dense:
        ax.axhline(scale * dense[0][key], color=color, lw=0.8, label=line)
    if key == 'judge_per':
      ref = [r['judge_per_reference'] for r in rows if 'judge_per_reference' in r]
      if ref:
        ax.axhline(100 * ref[0], color='green', lw=0.8, ls=':', label='real speech')
    ax.set_xlabel('sparsity (%)')
    ax.set_title(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
  head = ('| run | sparsity | judge PER | MCD (dB) | F0 RMSE (Hz) | V/UV err | energy RMSE (dB) | '
          'dur. ratio | phone dur. MAE (ms) | copy-synthesis PER / MCD |')
  lines = [head, '|' + '---|' * 10]
  for r in rows:
    lines.append(f"| {r['name']} | {100 * r.get('sparsity', 0):.0f}% | {100 * r['judge_per']:.1f}% "
                 f"| {r['mcd_db']:.2f} | {r['f0_rmse_hz']:.1f} | {r['vuv_error']:.3f} | "
                 f"{r['energy_rmse_db']:.2f} | {r['duration_ratio']:.3f} | "
                 f"{r['phone_duration_mae_ms']:.1f} | "
                 f"{100 * r.get('judge_per_resynth', float('nan')):.1f}% / "
                 f"{r.get('mcd_db_resynth', float('nan')):.2f} |")
  ref = rows[0] if rows else None
  if ref:
    lines.append(f"\nSame sentences: judge PER on the reference renderings "
                 f"{100 * ref['judge_per_reference']:.1f}%, on shuffled-phone synthesis "
                 f"{100 * ref['judge_per_shuffled']:.1f}% ({int(ref['num_utterances'])} "
                 "utterances).")
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dense', required=True)
  p.add_argument('--judge', required=True)
  p.add_argument('--vocoder', default='')
  p.add_argument('--out', required=True)
  p.add_argument('--speaker', default='us1')
  p.add_argument('--num', type=int, default=40)
  p.add_argument('--sparsities', default='0,0.3,0.5,0.7,0.9')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--augment', type=int, default=300, help='0 = no augmented runs')
  p.add_argument('--skip-griffin-lim', action='store_true')
  p.add_argument('--vocoder-sparsities', default='',
                 help='also prune the vocoder (with --vocoder): e.g. 0,0.3,0.5,0.7,0.9; rows '
                 'vocoder_sXX speak with the dense acoustic model')
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  os.makedirs(args.out, exist_ok=True)
  results = os.path.join(args.out, 'results.jsonl')
  done = _done(results)

  def record(name, row):
    row = {'name': name, **row}
    with open(results, 'a') as f:
      f.write(json.dumps(row) + '\n')
    done[name] = row
    print(json.dumps(row), flush=True)

  voc = args.vocoder
  if not args.skip_griffin_lim and 'dense_griffin_lim' not in done:
    record('dense_griffin_lim', {'sparsity': 0.0, **_evaluate(args.dense, args, 'dense_gl', '',
                                                                args.out)})
  if voc and 'dense_vocoder' not in done:
    record('dense_vocoder', {'sparsity': 0.0, **_evaluate(args.dense, args, 'dense_vocoder', voc,
                                                            args.out)})
  datas = ['original'] + (['augmented'] if args.augment > 0 else [])
  for data in datas:
    manifest = augmented_manifest(args, voc) if data == 'augmented' else ''
    for s in (float(x) for x in args.sparsities.split(',')):
      name = f's{int(round(s * 100)):02d}_{data}'
      if name in done:
        continue
      t0 = time.time()
      wd = finetune(args, s, data, manifest)
      train_s = round(time.time() - t0, 1)
      record(name, {'sparsity': s, 'data': data, 'finetune_seconds': train_s,
                    **_evaluate(wd, args, name, voc, args.out)})
  for s in (float(x) for x in args.vocoder_sparsities.split(',') if x):
    name = f'vocoder_s{int(round(s * 100)):02d}'
    if name in done or not voc:
      continue
    t0 = time.time()
    wd = finetune_vocoder(args, s)
    record(name, {'sparsity': s, 'data': 'vocoder', 'finetune_seconds': round(time.time() - t0, 1),
                  **_evaluate(args.dense, args, name, wd, args.out)})
  rows = list(done.values())
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(table(rows) + '\n')
  plot(rows, os.path.join(args.out, 'pruning.png'))
  print(table(rows))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
