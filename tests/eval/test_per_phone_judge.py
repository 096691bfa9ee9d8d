"""The `per` task dispatches a 'phone_posteriors' model (the phone judge) to frame decoding: a
stub judge whose posteriors read the waveform's sign gives hand-checked PERs."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from jaxspeech.eval import per
from jaxspeech.methods import hubert
from jaxspeech.methods import phone_judge as pj

PHONES = ['_', 'a', 'b']


def sign_posteriors(wav, mask):
  """Stub judge: frame f is 'a' where its 10 ms hop's samples are mostly positive, else 'b';
  `[B, S], [B, S] -> ([B, F, 3] log-probs, [B, F])` at the judge's frame geometry."""
  f = hubert.num_mfcc_frames(wav.shape[1])
  hops = wav[:, :f * hubert.HOP].reshape(wav.shape[0], f, hubert.HOP).mean(-1)  # [B, F]
  ids = jnp.where(hops > 0, 1, 2)
  logits = 4.0 * (jnp.arange(3)[None, None, :] == ids[..., None])
  frames = hubert.num_mfcc_frames(jnp.sum(mask, -1))
  return jax.nn.log_softmax(logits, axis=-1), jnp.arange(f)[None, :] < frames[:, None]


def _ctx(tmp_path, predict):
  from data_pipelines.manifest import write_manifest
  from experiments import phone_judge as exp

  rows = []
  ab = [['_', 0.0, 0.1], ['a', 0.1, 0.5], ['b', 0.5, 1.0]]
  aba = [['a', 0.0, 0.3], ['b', 0.3, 0.6], ['a', 0.6, 1.0]]
  for i, (signs, ali) in enumerate([((1, -1), ab), ((-1, 1), ab), ((1, -1), aba)]):
    wav = np.concatenate([np.full(8000, s, np.float32) for s in signs])
    wav += 0.01 * np.random.default_rng(i).normal(size=wav.size).astype(np.float32)
    path = str(tmp_path / f'u{i}.wav')
    sf.write(path, wav * 0.1, 16000)
    rows.append({'path': path, 'n_samples': wav.size, 'sample_rate': 16000, 'id': f'u{i}',
                 'speaker': 's', 'split': 'test', 'alignment': ali})
  manifest = str(tmp_path / 'm.jsonl')
  write_manifest(manifest, rows)
  c = exp.get_config('tiny')
  c.data.manifest = manifest
  method = pj.PhoneJudge(c)
  method.set_host_state({'phones': PHONES})
  from jaxspeech.eval.registry import EvalContext

  return EvalContext(config=c, method=method, model=None, extra={}, predict=predict)


def test_per_decodes_phone_posteriors(tmp_path):
  ctx = _ctx(tmp_path, {'phone_posteriors': sign_posteriors})
  rows = ctx.rows('test')
  # (+, -) -> a b: the reference a b; (-, +) -> b a: 2 substitutions; (+, -) -> a b against
  # a b a: 1 deletion. Each waveform is scaled to zero mean / unit variance first (the judge's
  # training input), which keeps the signs.
  assert per.hypotheses(ctx, rows) == [['a', 'b'], ['b', 'a'], ['a', 'b']]
  r = per.run(ctx, split='test')
  assert r == {'per': pytest.approx((0 + 2 + 1) / 7), 'num_utterances': 3.0}


def test_per_names_what_a_model_without_phones_offers(tmp_path):
  from jaxspeech.eval.registry import EvalError

  ctx = _ctx(tmp_path, {'features': lambda w, m, layer: None})
  with pytest.raises(EvalError, match='phone_posteriors'):
    per.run(ctx, split='test')
  # transcribe on a model without the prediction says so.
  with pytest.raises(ValueError, match='phone_posteriors'):
    pj.transcribe(types.SimpleNamespace(method=ctx.method, predict={}, config=ctx.config),
                  [np.zeros(16000, np.float32)])
