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

Library: `synthesize_mels(ctx, phone_lists, speaker)` and `vocode(mels, vocoder_ctx)` are what
`evaluate --task tts` and the pruning study call.

Legend: B batch, P phones, T mel frames, M mel bins.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeech import errors
from jaxspeech.audio import SAMPLE_RATE
from jaxspeech.ops import mel as mel_ops

PROG = 'python -m jaxspeech.synthesize'


class SynthesisError(errors.UserError, ValueError):
  """A flag, text or checkpoint this command cannot use; the message names it."""


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield start, min(start + batch_size, n)


def synthesize_mels(ctx, phone_lists: Sequence[Sequence[str]], speakers: str | Sequence[str],
                    duration_scale: float = 1.0, batch_size: int = 16,
                    durations: Sequence[np.ndarray] | None = None,
                    with_durations: bool = False):
  """Log-mel `[T_i, M]` per phone sequence from a TTS context (`workdir.load_context`).

  Predicted durations (scaled by `duration_scale`), or the given integer `durations` per phone
  (teacher forcing). `with_durations`: also the frames per phone `[P_i]` used, (mels, durs). Batches are padded to `method.max_phones` phones and `method.max_frames()`
  frames (one compilation); a sequence whose frames exceed that is cut there."""
  method = ctx.method
  if isinstance(speakers, str):
    speakers = [speakers] * len(phone_lists)
  p, t = method.max_phones, method.max_frames()
  synth = jax.jit(ctx.need('synthesize'), static_argnums=(2,))
  forced = jax.jit(ctx.need('teacher_forced_mel'), static_argnums=(3,))
  out, used = [], []
  for a, b in _batches(len(phone_lists), batch_size):
    ids = np.zeros((batch_size, p), np.int32)
    spk = np.zeros((batch_size,), np.int32)
    dur = np.zeros((batch_size, p), np.int32)
    for r, i in enumerate(range(a, b)):
      seq = list(phone_lists[i])
      if not seq:
        raise SynthesisError(f'utterance {i}: no phones')
      if len(seq) > p:
        raise SynthesisError(f'utterance {i}: {len(seq)} phones > the model\'s max_phones {p}')
      ids[r, :len(seq)] = method.phone_ids(seq)
      spk[r] = method.speaker_id(speakers[i])
      if durations is not None:
        dur[r, :len(seq)] = durations[i]
    if durations is None:
      mel, mask, dur = synth(jnp.asarray(ids), jnp.asarray(spk), t, float(duration_scale))
    else:
      mel, mask = forced(jnp.asarray(ids), jnp.asarray(spk), jnp.asarray(dur), t)
    mel, mask, dur = np.asarray(mel), np.asarray(mask), np.asarray(dur)
    for r, i in enumerate(range(a, b)):
      out.append(mel[r, :max(int(mask[r].sum()), 1)])
      used.append(dur[r, :len(phone_lists[i])])
  return (out, used) if with_durations else out


def vocode(mels: Sequence[np.ndarray], vocoder_ctx=None, rng: jax.Array | None = None,
           griffin_lim_iters: int = 60, batch_size: int = 8) -> list[np.ndarray]:
  """Waveforms `[T_i * hop]` of log-mels `[T_i, M]`: the vocoder context's 'vocode', or
  Griffin-Lim when `vocoder_ctx` is None. Padded to a few lengths (multiples of 64 frames)."""
  cfg = mel_ops.MelConfig()
  rng = jax.random.key(0) if rng is None else rng
  if vocoder_ctx is not None:
    fn = jax.jit(vocoder_ctx.need('vocode'))
  else:
    fn = jax.jit(lambda m, key: mel_ops.griffin_lim(m, (m.shape[1] - 1) * cfg.hop, key,
                                                    n_iter=griffin_lim_iters, cfg=cfg))
  out = [None] * len(mels)
  order = sorted(range(len(mels)), key=lambda i: len(mels[i]))
  for a, b in _batches(len(order), batch_size):
    idx = order[a:b]
    t = -(-max(len(mels[i]) for i in idx) // 64) * 64
    # Padding frames are silence (the log floor), so they add no energy to the real frames.
    batch = np.full((batch_size, t, cfg.n_mels), np.log(mel_ops.LOG_FLOOR), np.float32)
    for r, i in enumerate(idx):
      batch[r, :len(mels[i])] = mels[i]
    if vocoder_ctx is not None:
      wav = np.asarray(fn(jnp.asarray(batch)))
    else:
      wav = np.asarray(fn(jnp.asarray(batch), jax.random.fold_in(rng, a)))
    for r, i in enumerate(idx):
      out[i] = wav[r, :(len(mels[i]) - 1) * cfg.hop].astype(np.float32)
  return out


def write_wav(path: str, wav: np.ndarray) -> None:
  """16 kHz PCM16, peak-normalised to 0.95 (a silent input stays silent)."""
  import soundfile as sf

  peak = float(np.abs(wav).max(initial=0.0))
  wav = 0.95 * wav / peak if peak > 0 else wav
  sf.write(path, np.clip(wav, -1.0, 1.0), SAMPLE_RATE, subtype='PCM_16')


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
  mels = synthesize_mels(ctx, phones, args.speaker, args.duration_scale)
  wavs = vocode(mels, voc)
  os.makedirs(args.out, exist_ok=True)
  for i, wav in enumerate(wavs):
    path = os.path.join(args.out, f'{i:03d}_{args.speaker}.wav')
    write_wav(path, wav)
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
