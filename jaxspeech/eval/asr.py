"""ASR error rates (PER / WER / CER) and CTC evaluation of a checkpoint on a manifest.

Error rates are corpus-level, as jiwer and sclite report them: the sum over utterances of the
Levenshtein distance (unit-cost substitutions, deletions, insertions) between reference and
hypothesis token sequences, divided by the total number of reference tokens. Tokens are words
(WER: whitespace-split), characters (CER: every character of the whitespace-normalised string,
spaces included, as jiwer.cer counts them) or phones (PER: the space-separated phone strings).

    python -m jaxspeech.evaluate --task ctc --checkpoint DIR --manifest M [--split test]

`evaluate_ctc(workdir, manifest)` -> {"per": ...} for a phone model, {"wer": ..., "cer": ...} for
a character model (the unit is the training config's `method.unit`).
"""

from __future__ import annotations

import os
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


def _normalise(text: str) -> str:
  return ' '.join(text.split())


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  return error_rate([r.split() for r in refs], [h.split() for h in hyps])


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  return error_rate([_normalise(r) for r in refs], [_normalise(h) for h in hyps])


def per(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Phone error rate of space-separated phone strings."""
  return error_rate([r.split() for r in refs], [h.split() for h in hyps])


# ---------------------------------------------------------------------------------------------
# Evaluating a CTC checkpoint.


def load_ctc_workdir(workdir: str):
  """(method, model) of a CTC training workdir: its config.json and latest parameters."""
  from jaxspeech.methods.ctc import CtcFinetuning
  from jaxspeech.train.checkpoint import load_workdir_model

  def make_method(config):
    if config.method.name not in ('ctc', 'parp'):
      raise ValueError(f'{workdir}: method {config.method.name!r} is not a CTC model')
    return CtcFinetuning(config)

  method, model, _, _ = load_workdir_model(workdir, make_method)
  return method, model


def transcribe(method, model, wavs: Sequence[np.ndarray], batch_size: int = 8,
               bucket: int = 16000) -> list[list[str]]:
  """Greedy CTC transcription of 16 kHz waveforms (normalised like the training pipeline):
  one token list per utterance. Utterances are length-sorted and padded to whole `bucket`s."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxspeech.methods.ctc import greedy_decode

  graphdef, state = nnx.split(model)

  @jax.jit
  def best_path(state, wav, mask):
    m = nnx.merge(graphdef, state)
    logits, frame_mask = m(wav, mask)
    return jnp.argmax(logits, axis=-1), frame_mask  # [B, T]

  out: list[list[str] | None] = [None] * len(wavs)
  order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    s = max(-(-max(len(wavs[i]) for i in idx) // bucket) * bucket, bucket)
    wav = np.zeros((batch_size, s), np.float32)
    mask = np.zeros((batch_size, s), bool)
    for r, i in enumerate(idx):
      w = np.asarray(wavs[i], np.float32)
      wav[r, :len(w)] = (w - w.mean()) / np.sqrt(w.var() + 1e-7)  # as the pipeline normalises
      mask[r, :len(w)] = True
    ids, fmask = best_path(state, jnp.asarray(wav), jnp.asarray(mask))
    seqs = greedy_decode(np.asarray(ids), np.asarray(fmask))
    for r, i in enumerate(idx):
      out[i] = method.vocab.decode(seqs[r])
  return out  # type: ignore[return-value]


def evaluate_ctc(checkpoint: str, manifest: str, split: str = '',
                 batch_size: int = 8) -> dict[str, float]:
  """PER (phone model) or WER + CER (character model) of greedy CTC decoding of a training
  workdir on the rows of `manifest` (only those of `split` when given)."""
  from data_pipelines.manifest import read_manifest
  from jaxspeech.audio import load_audio, normalize_waveform
  from jaxspeech.methods.ctc import reference_tokens

  if not os.path.exists(manifest):
    raise FileNotFoundError(f'--manifest {manifest}: no such file')
  rows = read_manifest(manifest)
  if split:
    rows = [r for r in rows if r.get('split') == split]
  method, model = load_ctc_workdir(checkpoint)
  unit = method.unit
  rows = [r for r in rows if reference_tokens(r, unit)]
  if not rows:
    field = 'phones' if unit == 'phone' else 'text'
    raise ValueError(f'--manifest {manifest}: no row with a {field} reference'
                     + (f' in split {split!r}' if split else ''))
  # Per-utterance zero mean / unit variance, as the training pipeline feeds the model.
  wavs = [normalize_waveform(load_audio(r['path'])) for r in rows]
  hyps = transcribe(method, model, wavs, batch_size)
  refs = [reference_tokens(r, unit) for r in rows]
  if unit == 'phone':
    return {'per': error_rate(refs, hyps)}
  ref_txt = [method.vocab.to_text(r) for r in refs]
  hyp_txt = [method.vocab.to_text(h) for h in hyps]
  return {'wer': wer(ref_txt, hyp_txt), 'cer': cer(ref_txt, hyp_txt)}
