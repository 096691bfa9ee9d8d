r"""Evaluation of a checkpoint by one registered task on a manifest; prints one JSON line.

    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task units --layer L --k K
    python -m jaxspeech.evaluate --checkpoint WORKDIR --manifest M --task units --layer last --units
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task abx --layer L
    python -m jaxspeech.evaluate --checkpoint DIR|mfcc --manifest M --task speaker_probe --layer L
    python -m jaxspeech.evaluate --checkpoint WORKDIR --manifest M --task ctc [--split test]
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task classification --split test
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task av_classification --split test
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task retrieval --split test
    python -m jaxspeech.evaluate --checkpoint TTS_WORKDIR --task tts --judge JUDGE [--vocoder V]

`--task` names a module of the evaluation registry (`jaxspeech/eval/<task>.py` with
`run(ctx, **args)`, `jaxspeech.eval.registry`): the very functions `config.evals` runs during
training. The flags below are passed to the task as keyword arguments (only those given; a flag
the task does not take is an error). Tasks and output:
  units          k-means (K clusters, `--standardize` z-scores the features first) of layer L,
                 fitted on the evaluated frames or, with `--fit_split S`, on the frames of the
                 manifest's split S (fairseq fits k-means on training data and labels held-out
                 sets with it: `--split test --fit_split train`), or with `--units` (alias
                 `--codebook`) the model's own units (its method's 'units' prediction: Spin's
                 codebook, DinoSR's codebook of layer L), scored against 50 Hz frame phone
                 labels: {"pnmi", "phone_purity", "cluster_purity"}, plus "speaker_nmi" (the
                 share of the speaker entropy the units explain; lower = more speaker-invariant)
                 given >= 2 speakers (`jaxspeech.eval.units`).
  abx            ZeroSpeech-style ABX error (%) on phone segments in context (triphones), DTW on
                 angular distance, libri-light's averaging, ZeroSpeech 2021's item subsampling
                 (10 items per cell, 5 X speakers): {"abx_within", "abx_across"}
                 (`jaxspeech.eval.abx`).
  speaker_probe  linear speaker classifiers (logistic regression, L2 strength chosen by 5-fold
                 cross-validation on the training utterances) on utterance-mean features and on
                 single frames, accuracy on held-out utterances of the same speakers:
                 {"accuracy", "train_accuracy", "C", "chance", "frame_accuracy", ...}
                 (`jaxspeech.eval.speaker_probe`; with two speakers it saturates at 1.0: probe
                 more, e.g. all 8 of the built-in corpus).
  ctc            greedy CTC decoding of a ctc/parp training workdir's 'logits' with its
                 vocabulary: {"per"} (phone model) or {"wer", "cer"} (character model).
  classification accuracy of a classifier's 'labels' prediction: {"accuracy", "num_examples"}.
  av_classification  audio-only, visual-only and AV (mean of logits) accuracy of an audio-visual
                 classifier (UAVM): {"audio", "visual", "av", ...}
                 (`jaxspeech.eval.av_classification`).
  retrieval      audio->image and image->audio recall@1/5/10 of a cross-modal model (CMCM) on
                 the split's pairs, chance, codebook usage (`jaxspeech.eval.retrieval`).
  tts            a TTS workdir speaks `--num` unseen grammar sentences with `--speaker`'s voice
                 (through `--vocoder`, or Griffin-Lim): the `--judge` recogniser's PER on them,
                 on the reference renderings and on shuffled-phone speech; MCD, F0 RMSE, energy
                 and duration statistics against the references (`jaxspeech.eval.tts`).

`--checkpoint` is an HF checkpoint directory (config.json + weights), a jaxspeech training workdir
(its `config.json`, latest checkpoint and host state; the tasks see its method's predictions,
`Method.predict_fns`), or `mfcc` (39-d MFCC + deltas at 50 Hz, the HuBERT iteration-1 features as
fairseq's dump_mfcc_feature.py computes them: samples in [-1, 1], or x 32768 with
`--mfcc_input_scale kaldi`; `--layer` is ignored); see `jaxspeech.workdir.load_context`, also for
how the waveforms are normalised. `--layer` is a hidden-state index (0 = transformer input, HF
`hidden_states` convention; negative counts from the end) or `last`. `--manifest` defaults to a
workdir's own training manifest. Frame phone labels come from the manifest's `alignment` rows (frame
t = phone covering its centre at 50 Hz); `--split` keeps only rows of one split (e.g. `test`, the
held-out speakers of the built-in corpus). User errors (a bad flag value such as `--k 0`, a missing
checkpoint or manifest, rows without alignments for units/abx, a task the model cannot do, a
checkpoint of another architecture, ...) print one line `PROG: error: ...` naming the flag or file
to stderr and exit with code 2 (`jaxspeech.errors.run_cli`); only a bug shows a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Sequence

from jaxspeech import errors
from jaxspeech import workdir as workdir_lib
from jaxspeech.eval import registry
from jaxspeech.eval.registry import EvalError

PROG = 'python -m jaxspeech.evaluate'
# CLI flags that are task arguments (passed when given).
TASK_FLAGS = ('layer', 'k', 'units', 'split', 'seed', 'standardize', 'fit_split', 'judge',
              'vocoder', 'speaker', 'num', 'out')


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (argparse reports anything else as a usage error, exit 2)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
  return value


def evaluate(checkpoint: str, manifest: str, task: str, mfcc_input_scale: str | None = None,
             **args) -> dict[str, float]:
  """Task `task` of the registry on `checkpoint` ('mfcc', an HF folder or a workdir) with the
  rows of `manifest` ('' = the workdir's training manifest); `args` are the task's keyword
  arguments. A task argument the task does not take is an EvalError naming its flag.
  `mfcc_input_scale` is the `mfcc` checkpoint's waveform scale (`workdir.load_context`)."""
  module = registry.task_module(task)
  params = inspect.signature(module.run).parameters
  unknown = [k for k in args if k not in params]
  if unknown:
    raise EvalError(f'--{unknown[0]} does not apply to --task {task} (it takes '
                    f'{sorted(k for k in params if k != "ctx")})')
  if manifest and not os.path.exists(manifest):
    raise EvalError(f'--manifest {manifest}: no such file')
  ctx = workdir_lib.load_context(checkpoint, mfcc_input_scale=mfcc_input_scale)
  try:
    return registry.run_task(ctx, task, **({'manifest': manifest} if manifest else {}), **args)
  except ValueError as e:
    if errors.is_user_error(e):
      raise
    # The evaluation functions reject unusable data with ValueError (e.g. a test speaker without
    # training utterances, references without a token): a user error of this command.
    raise EvalError(f'--task {task}: {e}') from e


class EncoderFeatures:
  """DinoSR codebook units of an encoder in memory (`jaxspeech.methods.dinosr.codebook_units_fn`).

  Kept for tests/methods/test_dinosr.py; new code calls `Method.predict_fns(...)['units']`."""

  def __init__(self, encoder, codebooks, num_target_layers: int = 0, normalize: bool = True,
               target_output: str = 'block'):
    from jaxspeech.methods import dinosr

    del num_target_layers, normalize  # the codebooks' leading dim; the caller feeds the input
    self.codebook_units = dinosr.codebook_units_fn(encoder, dinosr.stacked_codebooks(codebooks),
                                                   target_output)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns its exit code (0, or 2 after one `error:` line for a user error;
  argparse exits 2 itself for a bad flag)."""
  return errors.run_cli(_main, argv, prog=PROG)


def _main(argv: Sequence[str] | None) -> int:
  from jaxspeech.methods.hubert import MFCC_INPUT_SCALES

  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='HF dir, jaxspeech workdir, or mfcc')
  p.add_argument('--manifest', default='',
                 help="JSONL manifest ('' = the workdir's training manifest)")
  p.add_argument('--task', required=True,
                 help='a registered task: units, abx, speaker_probe, ctc, classification, '
                      'av_classification, retrieval, ...')
  p.add_argument('--layer', default=None, help="hidden-state index or 'last' (default)")
  p.add_argument('--k', type=positive_int, default=None,
                 help='k-means clusters, >= 1 (units; default 50)')
  p.add_argument('--units', '--codebook', dest='units', action='store_true',
                 help="units: the model's own units (Spin, DinoSR codebooks) instead of k-means")
  p.add_argument('--split', default=None, help="only manifest rows with this split ('' = all)")
  p.add_argument('--seed', type=int, default=None)
  p.add_argument('--standardize', action='store_true',
                 help='units: z-score each feature dimension before k-means (default: raw)')
  p.add_argument('--fit_split', default=None,
                 help="units: fit k-means on the manifest rows of this split (e.g. train) and "
                 "assign the evaluated rows ('' = fit on the evaluated rows)")
  p.add_argument('--mfcc_input_scale', default=None, choices=tuple(MFCC_INPUT_SCALES),
                 help="--checkpoint mfcc: the waveform as fairseq feeds it, in [-1, 1] "
                 "(default), or x 32768 as Kaldi's int16 (the baseline before Dec 2)")
  p.add_argument('--judge', default=None, help='tts: a phone_judge workdir (the recogniser)')
  p.add_argument('--vocoder', default=None, help="tts: a vocoder workdir (default Griffin-Lim)")
  p.add_argument('--speaker', default=None, help='tts: the training voice to speak with (us1)')
  p.add_argument('--num', type=positive_int, default=None,
                 help='tts: held-out sentences to synthesise (default 40)')
  p.add_argument('--out', default=None, help='tts: write the first 8 syntheses as WAVs here')
  args = p.parse_args(argv)
  given = {k: getattr(args, k) for k in TASK_FLAGS
           if getattr(args, k) not in (None, False, '')}
  result = evaluate(args.checkpoint, args.manifest, args.task,
                    mfcc_input_scale=args.mfcc_input_scale, **given)
  print(json.dumps({k: float(v) for k, v in result.items()}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
