r"""Speech synthesis from a TTS workdir (`jaxspeech.methods.tts`) and a vocoder.

    python -m jaxspeech.synthesize --checkpoint runs/tts_tiny [--vocoder runs/vocoder_tiny] \
        --text "The old man saw a bird." --speaker us1 --out samples/
    python -m jaxspeech.synthesize --checkpoint runs/tts_tiny --text-file sentences.txt \
        --speaker us1 --out samples/ [--duration-scale 1.1]

Text -> phones with espeak-ng exactly as the built-in corpus was rendered
(`data_pipelines.synth.text_to_phones`: the voice's MBROLA phone set, pauses as `_`), phones ->
log-mel with the predicted durations, log-mel -> waveform by the vocoder workdir (its 'vocode'
prediction) or, without `--vocoder`, Griffin-Lim (60 iterations of fast Griffin-Lim,
`jaxspeech.ops.mel.griffin_lim`). Writes `OUT/<i>_<speaker>.wav` (16 kHz PCM16, peak 0.95) and
prints their paths. User errors (no such workdir, an unknown speaker, a phone outside the model's
inventory, an empty text) print one line and exit with code 2.

The synthesis itself is `jaxspeech.eval.tts.synthesize_mels` and `vocode` (what `evaluate --task
tts` runs); `speak_manifest` writes TTS-augmentation data (benchmarks/tts_study.py).

Legend: B batch, P phones, T mel frames, M mel bins.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from jaxspeech import errors
from jaxspeech.audio import SAMPLE_RATE
from jaxspeech.eval.tts import synthesize_mels, vocode, write_wav
from jaxspeech.ops import mel as mel_ops

PROG = 'python -m jaxspeech.synthesize'


class SynthesisError(errors.UserError, ValueError):
  """A flag, text or checkpoint this command cannot use; the message names it."""


def speak_manifest(ctx, texts: Sequence[str], speakers: Sequence[str], out_dir: str,
                   vocoder_ctx=None, split: str = 'train') -> str:
  """TTS-augmentation data: the model speaks `texts[i]` with `speakers[i]`; writes the WAVs and
  `out_dir/manifest.jsonl` whose rows carry the text, speaker, `split` and an `alignment` from
  the durations the model used (phone i spans its frames' times), so the rows train a TTS model
  like real ones. Returns the manifest path."""
  from data_pipelines.manifest import write_manifest
  from data_pipelines.synth import text_to_phones

  cfg = mel_ops.MelConfig()
  phones = [text_to_phones(t, s) for t, s in zip(texts, speakers)]
  mels, durs = synthesize_mels(ctx, phones, list(speakers), with_durations=True)
  wavs = vocode(mels, vocoder_ctx)
  os.makedirs(os.path.join(out_dir, 'wavs'), exist_ok=True)
  rows = []
  for i, (text, spk, seq, dur, wav) in enumerate(zip(texts, speakers, phones, durs, wavs)):
    path = os.path.join(out_dir, 'wavs', f'tts_{i:05d}.wav')
    write_wav(path, wav)
    ends = np.cumsum(dur) / cfg.frame_rate
    starts = ends - dur / cfg.frame_rate
    ali = [[p, round(float(a), 4), round(float(b), 4)] for p, a, b in zip(seq, starts, ends)
           if b > a]
    rows.append({'path': path, 'n_samples': int(len(wav)), 'sample_rate': SAMPLE_RATE,
                 'speaker': spk, 'text': text, 'phones': ' '.join(p for p, _, _ in ali),
                 'alignment': ali, 'split': split, 'source': 'tts'})
  path = os.path.join(out_dir, 'manifest.jsonl')
  write_manifest(path, rows)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  return errors.run_cli(_main, argv, prog=PROG)


def _main(argv: Sequence[str] | None) -> int:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='a tts training workdir')
  p.add_argument('--vocoder', default='', help="a vocoder workdir ('' = Griffin-Lim)")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument('--text', help='one sentence')
  g.add_argument('--text-file', help='one sentence per line')
  p.add_argument('--speaker', required=True, help='a training speaker of the TTS model')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--duration-scale', type=float, default=1.0, help='> 1 speaks slower')
  args = p.parse_args(argv)
  from data_pipelines.synth import text_to_phones
  from jaxspeech.workdir import load_context

  if args.text_file:
    if not os.path.exists(args.text_file):
      raise SynthesisError(f'--text-file {args.text_file}: no such file')
    with open(args.text_file, encoding='utf-8') as f:
      texts = [line.strip() for line in f if line.strip()]
  else:
    texts = [args.text.strip()] if args.text.strip() else []
  if not texts:
    raise SynthesisError('no text to speak (--text / --text-file is empty)')
  if not args.duration_scale > 0:
    raise SynthesisError(f'--duration-scale {args.duration_scale}: must be > 0')
  ctx = load_context(args.checkpoint)
  if ctx.method.name != 'tts':
    raise SynthesisError(f'--checkpoint {args.checkpoint}: a {ctx.method.name} workdir, not tts')
  voc = load_context(args.vocoder, label=f'--vocoder {args.vocoder}') if args.vocoder else None
  if args.speaker not in ctx.method.speakers:
    raise SynthesisError(f'--speaker {args.speaker}: not a training speaker of this model '
                         f'({", ".join(ctx.method.speakers)})')
  # Phonemised with the speaker's own espeak voice, as the corpus rendered its sentences.
  phones = [text_to_phones(t, args.speaker) for t in texts]
  try:
    mels = synthesize_mels(ctx, phones, args.speaker, args.duration_scale)
  except ValueError as e:  # a phone outside the model's inventory (the message names it)
    raise SynthesisError(str(e)) from e
  wavs = vocode(mels, voc)
  os.makedirs(args.out, exist_ok=True)
  for i, wav in enumerate(wavs):
    path = os.path.join(args.out, f'{i:03d}_{args.speaker}.wav')
    write_wav(path, wav)
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
