"""Evaluation task `per`: phone error rate of a phone recogniser against the rows' alignments.

    config.evals.per = {task: 'per', split: 'test'}
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task per [--manifest M] [--split test]

References are each row's `alignment` phones with silence dropped (the corpus's exact phone
sequence). Hypotheses by what the model predicts:
  'tokens'  (row-based models, e.g. wav2vec-U on cached features) frame token ids into
            `method.vocab`: runs merged, silence and the CTC blank dropped
            (`jaxspeech.methods.w2vu2.decode`, fairseq's viterbi decoding);
  'logits'  (CTC phone models on audio: `ctc` / `parp` workdirs with `method.unit = 'phone'`)
            greedy CTC decoding (`jaxspeech.eval.asr.transcribe`);
  'phone_posteriors'  (frame phone classifiers on audio: the `phone_judge` intelligibility
            judge) frame argmax, runs merged, silence dropped, the waveforms scaled as the
            judge's training pipeline did (`jaxspeech.methods.phone_judge.transcribe`).
Returns {"per", "num_utterances"}; PER = edit distance / reference length over all rows.
"""

from __future__ import annotations

import numpy as np


def decode_rows(ctx, rows: list[dict], batch_size: int = 64) -> list[list[str]]:
  """Phone sequences of rows through the method's 'tokens' prediction, batched with the
  method's own row fields (`host_fields`) at its static shapes."""
  import jax
  import jax.numpy as jnp

  from jaxspeech.methods.w2vu2 import decode

  predict = jax.jit(ctx.need('tokens'))
  spec = ctx.method.row_fields()
  vocab = ctx.method.vocab
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    fields = [ctx.method.host_fields(r) for r in chunk]
    fields += [{k: np.zeros(v.shape, v.dtype) for k, v in spec.items()}] * (batch_size - len(chunk))
    batch = {k: jnp.asarray(np.stack([np.asarray(f[k], spec[k].dtype) for f in fields]))
             for k in spec}
    batch['index'] = jnp.arange(start, start + batch_size, dtype=jnp.int32)
    batch['valid'] = jnp.arange(batch_size) < len(chunk)
    ids, mask = (np.asarray(a) for a in predict(batch))
    for r in range(len(chunk)):
      out.append(decode(ids[r], int(mask[r].sum()), vocab))
  return out


def hypotheses(ctx, rows: list[dict]) -> list[list[str]]:
  from jaxspeech.eval.registry import EvalError

  if 'tokens' in ctx.predict:
    return decode_rows(ctx, rows)
  if 'logits' in ctx.predict and getattr(ctx.method, 'unit', None) == 'phone':
    from jaxspeech.eval import common
    from jaxspeech.eval.asr import transcribe

    return transcribe(ctx, common.load_wavs(rows))
  if 'phone_posteriors' in ctx.predict:
    from jaxspeech.eval import common
    from jaxspeech.methods.phone_judge import transcribe

    return transcribe(ctx, common.load_wavs(rows))
  raise EvalError(f'per: the {ctx.method.name} model predicts no phones (it offers '
                  f'{sorted(ctx.predict)}; need "tokens", "phone_posteriors", or "logits" of a '
                  'phone CTC model)')


def run(ctx, manifest: str = '', split: str = 'test') -> dict[str, float]:
  from jaxspeech.eval.asr import error_rate
  from jaxspeech.eval.registry import EvalError
  from jaxspeech.methods.w2vu2 import reference_phones

  rows = [r for r in ctx.rows(split, manifest) if r.get('alignment')]
  if not rows:
    raise EvalError(f'per: no row with an alignment in split {split!r}')
  refs = [reference_phones(r) for r in rows]
  return {'per': error_rate(refs, hypotheses(ctx, rows)), 'num_utterances': float(len(rows))}
