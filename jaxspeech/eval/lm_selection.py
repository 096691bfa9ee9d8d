"""Evaluation task `lm_selection`: wav2vec-U's unsupervised model-selection metric.

    config.evals.selection = {task: 'lm_selection', split: 'train'}
    python -m jaxspeech.evaluate --checkpoint WORKDIR --task lm_selection --split train

No transcript is used: the model decodes the rows' (unlabelled) audio features
(`jaxspeech.eval.per.decode_rows`), and a phone n-gram LM fitted on the unpaired text
(`<text manifest stem>.lm.json`, written by `python -m data_pipelines.text`) scores the decoded
phone sequences. fairseq `w2vu_generate.py`: weighted_lm_ppl = LM perplexity / (fraction of the
text's phone vocabulary the outputs use)^2; lower is better. A generator that emits a few
frequent phones has a low perplexity but a poor vocabulary usage; the product trades them off.
Returns {"lm_ppl", "vocab_seen", "weighted_lm_ppl"}.
"""

from __future__ import annotations

import os


def lm_path(text_manifest: str) -> str:
  return os.path.splitext(text_manifest)[0] + '.lm.json'


def run(ctx, manifest: str = '', split: str = 'train', lm: str = '') -> dict[str, float]:
  from jaxspeech.eval.per import decode_rows
  from jaxspeech.eval.phone_lm import PhoneLM, weighted_lm_ppl
  from jaxspeech.eval.registry import EvalError

  path = lm or lm_path(getattr(ctx.method, 'text_path', None) or '')
  if not os.path.exists(path):
    raise EvalError(f'lm_selection: phone LM {path!r} not found (the text manifest\'s .lm.json, '
                    'python -m data_pipelines.text)')
  phone_lm = PhoneLM.load(path)
  rows = ctx.rows(split, manifest)
  hyps = decode_rows(ctx, rows)
  vocab = [p for p in phone_lm.vocab if p != '_']
  out = weighted_lm_ppl(hyps, phone_lm, vocab_size=len(vocab))
  return {k: float(out[k]) for k in ('lm_ppl', 'vocab_seen', 'weighted_lm_ppl')}
