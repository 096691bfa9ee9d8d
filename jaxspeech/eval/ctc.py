"""Evaluation task `ctc`: greedy CTC decoding of the model's 'logits' prediction with the method's
vocabulary, scored against the rows' references (`jaxspeech.eval.asr`): {"per"} for a phone model
(`method.unit == 'phone'`), {"wer", "cer"} for a character model.

    config.evals.dev = {task: 'ctc', split: 'test'}
    python -m jaxspeech.evaluate --checkpoint WORKDIR --manifest M --task ctc [--split test]

Rows without a reference (`phones` or `text`, as the unit says) are skipped. The waveforms are
fed as in training (each utterance normalised to zero mean / unit variance, then padded).
"""

from __future__ import annotations


def run(ctx, manifest: str = '', split: str = '', batch_size: int = 8) -> dict[str, float]:
  """`jaxspeech.eval.asr.ctc_error_rates` on the rows of `manifest` (default: the run's
  manifest) of `split`."""
  from jaxspeech.eval.asr import ctc_error_rates

  return ctc_error_rates(ctx, manifest, split, batch_size)
