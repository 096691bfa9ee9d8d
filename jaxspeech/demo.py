r"""Spin in miniature: pretrain a tiny encoder, Spin-fine-tune it, compare on held-out speakers.

    python -m jaxspeech.demo --workdir runs/demo
    python -m jaxspeech.demo --workdir runs/demo --pretrained runs/hubert_tiny   # reuse a workdir

Stages (each reused when a previous run finished it; progress is logged throughout):

  1. corpus     the built-in synthetic corpus (`data_pipelines.synth.built_in_corpus`: 8 speakers,
                exact phone alignments; `us2_high` and `en1_high` are held out, split "test").
  2. pretrain   HuBERT-style tiny pretraining (`experiments/hubert.py:tiny`) in WORKDIR/pretrain,
                or `--pretrained DIR` (a finished jaxspeech workdir of an encoder method).
  3. export     the pretrained encoder as an HF folder, WORKDIR/initial_encoder (Spin's
                `config.init_from`; it loads the encoder only, whatever the pretraining head was).
  4. spin       Spin fine-tuning (`experiments/spin.py:tiny`: top 1 of 4 layers, K=64) in
                WORKDIR/spin, on the training speakers only.
  5. evaluate   the initial and the Spin encoder on the held-out speakers' utterances, last layer:
                - speaker-ID linear probe on utterance means (`jaxspeech.evaluate`'s protocol:
                  held-out utterances of the same speakers) and on single frames (a finer probe:
                  the held-out split has only two speakers, so utterance means are easy);
                - units at the same K: Spin's own units argmax(z Cᵀ) vs k-means (K clusters) of the
                  initial model's features, fitted on the training speakers' utterances and
                  assigning the held-out frames (fairseq's protocol; also fitted on the held-out
                  frames themselves, for reference); PNMI, phone purity, cluster purity against
                  the 50 Hz frame phone labels (also k-means on the Spin model's features),
                  and the speaker information in the units, I(unit; speaker) / H(speaker);
                - ABX error within / across speakers (DTW on cosine distance, triphone items).
                The table is printed and written to WORKDIR/results.json.

User errors (a bad flag, a `--pretrained` folder without checkpoint, a bad audio file...) print
one line `python -m jaxspeech.demo: error: ...` and exit with code 2 (`jaxspeech.errors.run_cli`);
only a bug shows a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging as logging_std
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from jaxspeech import errors

PROG = 'python -m jaxspeech.demo'

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Where every stage writes its outputs.')
_PRETRAINED = flags.DEFINE_string(
  'pretrained', '', 'A finished jaxspeech workdir to use as the initial encoder (skips stage 2).')
_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 1000, 'HuBERT-style pretraining steps.')
_SPIN_STEPS = flags.DEFINE_integer('spin_steps', 600, 'Spin fine-tuning steps.')
_EVAL_SPLIT = flags.DEFINE_string('eval_split', 'test', 'Manifest split evaluated (held out).')
_FRAMES_PER_UTT = flags.DEFINE_integer('probe_frames', 20, 'Frames per utterance, frame probe.')
_SPIN_LR = flags.DEFINE_float('spin_lr', 0.0, 'Spin peak learning rate (0 = the tiny config).')

LAYER = 'last'
FIT_SPLIT = 'train'  # k-means of the evaluation is fitted on this split's utterances
# experiments/ next to the jaxspeech package (a checkout, or site-packages after `pip install .`).
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'experiments')


class Stage:
  """Logs '[demo i/5] name ...' and the stage's wall time."""

  def __init__(self, i: int, name: str):
    self.i, self.name = i, name

  def __enter__(self):
    self.t0 = time.perf_counter()
    logging.info('[demo %d/5] %s ...', self.i, self.name)
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      logging.info('[demo %d/5] %s done in %.0f s', self.i, self.name,
                   time.perf_counter() - self.t0)


def finished_step(workdir: str) -> int | None:
  """Latest checkpoint step of a jaxspeech workdir (None without one)."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return None
  steps = [int(s) for s in os.listdir(d) if s.isdigit()]
  return max(steps) if steps else None


def experiment_config(name: str, variant: str):
  """`experiments/<name>.py:get_config(variant)`, loaded by file path as `--config` loads it: the
  library never imports the `experiments` package (an import contract, `.importlinter`)."""
  path = os.path.join(EXPERIMENTS_DIR, f'{name}.py')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such experiment config')
  spec = importlib.util.spec_from_file_location(f'_jaxspeech_experiment_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def train(config, workdir: str) -> None:
  """Trains unless `workdir` already holds the final checkpoint (re-running resumes)."""
  from jaxspeech.train import trainer

  done = finished_step(workdir)
  if done is not None and done >= int(config.train.num_steps):
    logging.info('reusing %s (checkpoint at step %d)', workdir, done)
    return
  trainer.train_and_evaluate(config, workdir)


def export_encoder(workdir: str, out_dir: str, label: str | None = None) -> None:
  """The encoder of a jaxspeech workdir as an HF checkpoint folder (`label` names the workdir in
  errors)."""
  from jaxspeech.extract import load_model
  from jaxspeech.interop import hf

  hf.save_hf_checkpoint(load_model(os.path.abspath(workdir), label=label), out_dir + '.tmp')
  os.replace(out_dir + '.tmp', out_dir)


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_model(name: str, ctx, wavs, rows, k: int, fit_wavs,
                   fit_rows=None) -> dict[str, float]:
  """All metrics of one model (`ctx`: its `jaxspeech.workdir.load_context`), and of its own
  units when its method predicts them ('units'). k-means is fitted on `fit_wavs` (the training
  speakers' utterances, fairseq's protocol), and for reference also on the evaluated utterances
  themselves (`kmeans_fit_heldout_pnmi`). With `fit_rows`, the speaker probes are also run over
  every voice (`*_all`: the utterances of `fit_wavs` and `wavs`; two held-out voices saturate)."""
  from jaxspeech.eval import abx, common, speaker_probe
  from jaxspeech.eval import units as units_lib

  layer = common.layer_index(ctx, LAYER)
  res = {}
  t0 = time.perf_counter()
  feats = common.layer_outputs(ctx, wavs, layer)
  speakers = np.array([r['speaker'] for r in rows])
  probes = speaker_probe.probe_features(feats, speakers, frames_per_utt=_FRAMES_PER_UTT.value)
  res['speaker_acc_utterance'] = probes['accuracy']
  res['speaker_acc_frame'] = probes['frame_accuracy']
  logging.info('  %s: speaker probes %.3f (utterance) %.3f (frame) [%.0f s]', name,
               res['speaker_acc_utterance'], res['speaker_acc_frame'], time.perf_counter() - t0)
  if fit_rows is not None:
    every = speaker_probe.probe_features(
      common.layer_outputs(ctx, fit_wavs, layer) + list(feats),
      np.array([r['speaker'] for r in fit_rows] + list(speakers)),
      frames_per_utt=_FRAMES_PER_UTT.value)
    res['speaker_acc_utterance_all'] = every['accuracy']
    res['speaker_acc_frame_all'] = every['frame_accuracy']
    res['speaker_probe_all_voices'] = every['num_speakers']
    logging.info('  %s: speaker probes over %d voices %.3f (utterance) %.3f (frame) [%.0f s]',
                 name, every['num_speakers'], res['speaker_acc_utterance_all'],
                 res['speaker_acc_frame_all'], time.perf_counter() - t0)
  km = units_lib.evaluate_units(ctx, wavs, rows, layer, k, fit_wavs=fit_wavs)
  res.update({f'kmeans_{key}': v for key, v in km.items()})
  res['kmeans_fit_heldout_pnmi'] = units_lib.evaluate_units(ctx, wavs, rows, layer, k)['pnmi']
  if 'units' in ctx.predict:
    units = units_lib.predicted_units(ctx, wavs, layer)
    labels = common.frame_phone_labels(rows, [len(u) for u in units])
    y, u = np.concatenate(labels), np.concatenate(units)
    q = units_lib.unit_quality(y, u, y >= 0)
    res.update({f'units_{key}': q[key] for key in ('pnmi', 'phone_purity', 'cluster_purity')})
    res['units_used'] = q['num_units_used']
    frame_speakers = np.concatenate([[s] * len(v) for s, v in zip(speakers, units)])
    res['units_speaker_nmi'] = units_lib.speaker_nmi(frame_speakers, u)
  logging.info('  %s: units %s [%.0f s]', name,
               {key: round(v, 3) for key, v in res.items() if 'pnmi' in key},
               time.perf_counter() - t0)
  res.update(abx.evaluate_abx(ctx, wavs, rows, layer))
  logging.info('  %s: ABX within %.2f%% across %.2f%% [%.0f s]', name, res['abx_within'],
               res['abx_across'], time.perf_counter() - t0)
  return res


ROWS = (
  # (label, key in the initial model's results, key in Spin's)
  ('speaker-ID probe acc., utterance means (lower = more invariant)', 'speaker_acc_utterance',
   'speaker_acc_utterance'),
  ('speaker-ID probe acc., single frames (lower = more invariant)', 'speaker_acc_frame',
   'speaker_acc_frame'),
  ('  the same over all 8 voices (held-out utterances), utterance means',
   'speaker_acc_utterance_all', 'speaker_acc_utterance_all'),
  ('  the same over all 8 voices (held-out utterances), single frames', 'speaker_acc_frame_all',
   'speaker_acc_frame_all'),
  ('PNMI: initial k-means vs Spin units (same K)', 'kmeans_pnmi', 'units_pnmi'),
  ('  (k-means fitted on the held-out frames themselves)', 'kmeans_fit_heldout_pnmi',
   'kmeans_fit_heldout_pnmi'),
  ('phone purity: initial k-means vs Spin units', 'kmeans_phone_purity', 'units_phone_purity'),
  ('cluster purity: initial k-means vs Spin units', 'kmeans_cluster_purity',
   'units_cluster_purity'),
  ('PNMI: k-means on each model\'s features', 'kmeans_pnmi', 'kmeans_pnmi'),
  ('speaker info in units I(unit; spk)/H(spk) (lower = more invariant)', 'kmeans_speaker_nmi',
   'units_speaker_nmi'),
  ('ABX within speakers (%, lower = better)', 'abx_within', 'abx_within'),
  ('ABX across speakers (%, lower = better)', 'abx_across', 'abx_across'),
)


def format_table(initial: dict, spin: dict, k: int) -> str:
  lines = [f'{"held-out speakers, last layer, K=" + str(k):<66} {"initial":>9} {"Spin":>9}']
  for label, a, b in ROWS:
    lines.append(f'{label:<66} {initial[a]:>9.3f} {spin[b]:>9.3f}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------


def run(workdir: str) -> dict:
  from data_pipelines import synth
  from jaxspeech import workdir as workdir_lib
  from jaxspeech.audio import load_audio
  from jaxspeech.eval import common

  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  with Stage(1, 'corpus'):
    manifest = synth.built_in_corpus()
    logging.info('corpus: %s', manifest)

  with Stage(2, 'pretrain'):
    if _PRETRAINED.value:
      pre_dir = os.path.abspath(_PRETRAINED.value)
      if finished_step(pre_dir) is None:
        raise FileNotFoundError(f'--pretrained {pre_dir}: no checkpoint')
      pre_label = f'--pretrained {_PRETRAINED.value}'
      logging.info('reusing the pretrained workdir %s', pre_dir)
    else:
      pre_dir = os.path.join(workdir, 'pretrain')
      pre_label = f'the pretraining run {pre_dir}'
      c = experiment_config('hubert', 'tiny')
      c.train.num_steps = _PRETRAIN_STEPS.value
      train(c, pre_dir)

  init_dir = os.path.join(workdir, 'initial_encoder')
  with Stage(3, 'export the initial encoder'):
    if os.path.exists(os.path.join(init_dir, 'config.json')):
      logging.info('reusing %s', init_dir)
    else:
      export_encoder(pre_dir, init_dir, label=pre_label)

  spin_dir = os.path.join(workdir, 'spin')
  spin_cfg = experiment_config('spin', 'tiny')
  spin_cfg.init_from = init_dir
  spin_cfg.train.num_steps = _SPIN_STEPS.value
  if _SPIN_LR.value:
    spin_cfg.optim.learning_rate = _SPIN_LR.value
  with Stage(4, f'Spin fine-tuning ({_SPIN_STEPS.value} steps)'):
    train(spin_cfg, spin_dir)

  with Stage(5, f'evaluate on held-out speakers (split {_EVAL_SPLIT.value!r})'):
    rows = common.load_rows(manifest, _EVAL_SPLIT.value, need_alignment=True)
    wavs = [load_audio(r['path']) for r in rows]
    # k-means is fitted on the training speakers and labels the held-out ones (fairseq's
    # protocol: learn_kmeans.py on training data); Spin's codebook was learned on them too.
    fit_rows = common.load_rows(manifest, FIT_SPLIT, False)
    fit_wavs = [load_audio(r['path']) for r in fit_rows]
    k = int(spin_cfg.method.codebook_size)
    logging.info('%d utterances of %s; k-means fitted on the %d utterances of split %r',
                 len(rows), sorted({r['speaker'] for r in rows}), len(fit_wavs), FIT_SPLIT)
    initial = evaluate_model('initial', workdir_lib.load_context(
      init_dir, label=f'the initial encoder {init_dir}'), wavs, rows, k, fit_wavs, fit_rows)
    spin = evaluate_model('Spin', workdir_lib.load_context(
      spin_dir, label=f'the Spin run {spin_dir}'), wavs, rows, k, fit_wavs, fit_rows)

  table = format_table(initial, spin, k)
  result = {
    'initial': initial, 'spin': spin, 'k': k, 'layer': LAYER,
    'eval_split': _EVAL_SPLIT.value, 'kmeans_fit_split': FIT_SPLIT,
    'eval_speakers': sorted({r['speaker'] for r in rows}),
    'pretrained': pre_dir, 'spin_steps': _SPIN_STEPS.value,
    'wall_seconds': time.perf_counter() - t_start, 'table': table,
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(table, flush=True)
  print(f'wall time {result["wall_seconds"]:.0f} s; written to '
        f'{os.path.join(workdir, "results.json")}', flush=True)
  return result


class _QuietLibraries(logging_std.Filter):
  """Drops Orbax's INFO chatter (several lines per save / restore)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or 'orbax' not in record.pathname


class DemoError(errors.UserError, ValueError):
  """A flag of the demo that cannot be used; the message names it."""


parse_flags = errors.absl_flags_parser(PROG)


def main(argv):
  """`app.run`'s main: returns 2 after one `error:` line for a user error (`errors.run_cli`)."""
  return errors.run_cli(_main, argv, prog=PROG)


def _main(argv):
  if len(argv) > 1:
    raise DemoError(f'unexpected arguments: {argv[1:]}')
  for name in ('pretrain_steps', 'spin_steps', 'probe_frames'):
    if flags.FLAGS[name].value < 1:
      raise DemoError(f'--{name} {flags.FLAGS[name].value}: must be >= 1')
  if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
    raise DemoError(f'--workdir {_WORKDIR.value}: is a file')
  if _PRETRAINED.value and finished_step(_PRETRAINED.value) is None:  # before stage 1, not in 2
    raise DemoError(f'--pretrained {_PRETRAINED.value}: no checkpoint (not a finished jaxspeech '
                    'workdir)')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info('JAX %s on %s', jax.__version__, jax.devices())
  run(_WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
