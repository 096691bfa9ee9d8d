"""ASR error rates (PER / WER / CER) and CTC evaluation of a checkpoint on a manifest.

Error rates are corpus-level, as jiwer and sclite report them: the sum over utterances of the
Levenshtein distance (unit-cost substitutions, deletions, insertions) between reference and
hypothesis token sequences, divided by the total number of reference tokens.

- WER and CER on strings are jiwer's own (`jiwer.wer`, `jiwer.cer`, jiwer 4.0 defaults). Words:
  leading and trailing whitespace stripped, runs of two or more whitespace characters made one
  space, then split on the space character only (a lone tab or no-break space stays inside a word).
  Characters: leading and trailing whitespace stripped, every other character counted (spaces,
  tabs and repeated spaces included). When every reference is empty (after stripping) jiwer returns
  the number of hypothesis tokens (insertions), not a rate: 0.0 for empty hypotheses too, and 0.0
  for no utterance at all; an empty reference among others adds no reference token.
- PER (`per`, `error_rate`): phone token lists (or whitespace-split phone strings) through
  `edit_distance`; references without any token raise a ValueError.

    python -m jaxspeech.evaluate --task ctc --checkpoint DIR --manifest M [--split test]

`evaluate_ctc(workdir, manifest)` -> {"per": ...} for a phone model, {"wer": ..., "cer": ...} for
a character model (the unit is the training config's `method.unit`): the `ctc` evaluation task
(`jaxspeech.eval.ctc`) on a workdir.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
  """Levenshtein distance (substitution = deletion = insertion = 1) by dynamic programming.

  `d[i][j]` = distance between ref[:i] and hyp[:j]; one row kept at a time. O(|ref| |hyp|).
  """
  ref, hyp = list(ref), list(hyp)
  prev = list(range(len(hyp) + 1))  # d[0][j] = j insertions
  for i in range(1, len(ref) + 1):
    cur = [i] + [0] * len(hyp)  # d[i][0] = i deletions
    for j in range(1, len(hyp) + 1):
      cur[j] = min(prev[j] + 1,  # delete ref[i-1]
                   cur[j - 1] + 1,  # insert hyp[j-1]
                   prev[j - 1] + (ref[i - 1] != hyp[j - 1]))  # substitute / match
    prev = cur
  return prev[-1]


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
  """Corpus error rate: sum of edit distances / sum of reference lengths."""
  if len(refs) != len(hyps):
    raise ValueError(f'{len(refs)} references but {len(hyps)} hypotheses')
  total = sum(len(r) for r in refs)
  if total == 0:
    raise ValueError('error_rate: the references hold no token')
  return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def _jiwer(measure: str, refs: Sequence[str], hyps: Sequence[str]) -> float:
  import jiwer  # lazily: only the string error rates need it

  refs, hyps = list(refs), list(hyps)
  if len(refs) != len(hyps):
    raise ValueError(f'{len(refs)} references but {len(hyps)} hypotheses')
  return float(getattr(jiwer, measure)(refs, hyps))


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus word error rate, `jiwer.wer` (see the module docstring for tokens and empty refs)."""
  return _jiwer('wer', refs, hyps)


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Corpus character error rate, `jiwer.cer` (see the module docstring)."""
  return _jiwer('cer', refs, hyps)


def per(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Phone error rate of space-separated phone strings."""
  return error_rate([r.split() for r in refs], [h.split() for h in hyps])


# ---------------------------------------------------------------------------------------------
# Evaluating a CTC checkpoint.


def transcribe(ctx, wavs: Sequence[np.ndarray], batch_size: int = 8) -> list[list[str]]:
  """Greedy CTC transcription (best path: per-frame argmax, repeats collapsed, blanks dropped)
  of 16 kHz waveforms with `ctx.predict['logits']`: one token list per utterance."""
  import jax
  import jax.numpy as jnp

  from jaxspeech.eval.common import utterance_outputs
  from jaxspeech.methods.ctc import greedy_decode

  logits = ctx.need('logits')

  @jax.jit
  def best_path(wav, mask):
    x, frame_mask = logits(wav, mask)  # [B, T, V], [B, T]
    return jnp.argmax(x, axis=-1), frame_mask  # [B, T]

  ids = utterance_outputs(wavs, best_path, normalize=ctx.normalize, batch_size=batch_size)
  vocab = ctx.method.vocab
  return [vocab.decode(greedy_decode(i[None], np.ones((1, len(i)), bool))[0]) for i in ids]


def ctc_error_rates(ctx, manifest: str = '', split: str = '',
                    batch_size: int = 8) -> dict[str, float]:
  """The `ctc` evaluation task (`jaxspeech.eval.ctc`): greedy decoding of `ctx.predict['logits']`
  with `ctx.method.vocab` on the rows of `manifest` (default: the run's manifest) of `split`
  that have a reference; {"per"} (phone model) or {"wer", "cer"} (character model)."""
  from jaxspeech.eval import common
  from jaxspeech.eval.registry import EvalError
  from jaxspeech.methods.ctc import reference_tokens

  ctx.need('logits')
  unit, vocab = getattr(ctx.method, 'unit', None), getattr(ctx.method, 'vocab', None)
  if unit is None or vocab is None:
    raise EvalError(f'ctc: the {ctx.method.name} method has no output vocabulary (method.vocab, '
                    'method.unit)')
  rows = common.task_rows(ctx, manifest, split, need_alignment=False)
  rows = [r for r in rows if reference_tokens(r, unit)]
  if not rows:
    field = 'phones' if unit == 'phone' else 'text'
    raise EvalError(f'ctc: no row with a {field} reference'
                    + (f' in split {split!r}' if split else ''))
  hyps = transcribe(ctx, common.load_wavs(rows), int(batch_size))
  refs = [reference_tokens(r, unit) for r in rows]
  if unit == 'phone':
    return {'per': error_rate(refs, hyps)}
  ref_txt = [vocab.to_text(r) for r in refs]
  hyp_txt = [vocab.to_text(h) for h in hyps]
  return {'wer': wer(ref_txt, hyp_txt), 'cer': cer(ref_txt, hyp_txt)}
