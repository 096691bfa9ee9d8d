"""The phone judge: decoding of hand-made posteriors, frame labels from a hand alignment, the
spectral warp, padding invariance, a loss that falls on a fixed batch, and a short run through
`main`'s trainer scored by the `per` task (in process and by the CLI)."""

from __future__ import annotations

import contextlib
import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.methods import hubert
from jaxspeech.methods import phone_judge as pj

PHONES = ['_', 'a', 'b', 'c']


def _posteriors(ids, margin=3.0):
  """Log-softmax rows whose argmax is `ids` [F] -> [F, V]."""
  x = np.zeros((len(ids), len(PHONES)), np.float32)
  x[np.arange(len(ids)), ids] = margin
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_decode_frames_merges_runs_and_drops_silence():
  lp = _posteriors([0, 0, 1, 1, 1, 0, 2, 2, 2, 2, 3, 3, 0, 0])
  assert pj.decode_frames(lp, 14, PHONES) == ['a', 'b', 'c']
  # A repeated phone separated by silence is two phones; without silence it is one.
  assert pj.decode_frames(_posteriors([1, 1, 0, 1, 1]), 5, PHONES) == ['a', 'a']
  assert pj.decode_frames(_posteriors([1, 1, 1, 1]), 4, PHONES) == ['a']
  # Only the first n_frames count (padding frames after them are ignored).
  assert pj.decode_frames(lp, 5, PHONES) == ['a']
  assert pj.decode_frames(lp, 0, PHONES) == []
  assert pj.decode_frames(_posteriors([0, 0, 0]), 3, PHONES) == []


def test_decode_frames_min_run_and_smoothing():
  # A one-frame blip of 'c' inside 'a' splits it in two under the plain rule.
  ids = [1, 1, 1, 3, 1, 1, 2, 2, 2]
  assert pj.decode_frames(_posteriors(ids), 9, PHONES) == ['a', 'c', 'a', 'b']
  # min_run=2 drops the blip and merges the two halves of 'a'.
  assert pj.decode_frames(_posteriors(ids), 9, PHONES, min_run=2) == ['a', 'b']
  # A 3-frame moving average of the posteriors removes it too (the blip's frame averages to 'a').
  assert pj.decode_frames(_posteriors(ids), 9, PHONES, smooth=3) == ['a', 'b']
  # Smoothing keeps the edges: the window is renormalised inside the utterance.
  assert pj.decode_frames(_posteriors([2, 2, 1, 1, 1, 1]), 6, PHONES, smooth=3) == ['b', 'a']


def test_frame_labels_from_a_hand_alignment():
  row = {'alignment': [['_', 0.0, 0.05], ['a', 0.05, 0.12], ['b', 0.12, 0.30]],
         'n_samples': 4800, 'sample_rate': 16000}
  labels = pj.row_frame_labels(row, PHONES, 30)
  # 4800 samples: 1 + (4800 - 400) // 160 = 28 MFCC frames; frame i's window centre is at
  # 12.5 ms + 10 ms i: frames 0-3 in silence (< 50 ms), 4-10 'a' (52.5..112.5 ms), 11-27 'b'.
  want = [0] * 4 + [1] * 7 + [2] * 17 + [-1] * 2
  assert labels.dtype == np.int32 and labels.tolist() == want
  assert pj.row_frame_labels({'n_samples': 4800}, PHONES, 5).tolist() == [-1] * 5
  # Same utterance at 8 kHz: the same frames at 16 kHz.
  row8 = dict(row, n_samples=2400, sample_rate=8000)
  assert pj.row_frame_labels(row8, PHONES, 30).tolist() == want
  with pytest.raises(KeyError, match="'z'"):
    pj.row_frame_labels({'alignment': [['z', 0, 1]], 'n_samples': 16000}, PHONES, 10)


def _tone(freq, n=8000, seed=0):
  t = np.arange(n) / 16000
  rng = np.random.default_rng(seed)
  return (np.sin(2 * np.pi * freq * t) + 0.01 * rng.normal(size=n)).astype(np.float32)


def test_warped_mfcc_is_mfcc_at_one_and_moves_formants():
  warped, mfcc = jax.jit(pj.warped_mfcc), jax.jit(hubert.mfcc)
  wav = jnp.asarray(np.stack([_tone(700), _tone(1500, seed=1)]))
  np.testing.assert_allclose(warped(wav, jnp.ones(2)), mfcc(wav), rtol=1e-5, atol=1e-4)
  # A 1 kHz tone warped by 1.5 looks like a 1.5 kHz tone, not like itself.
  w = np.asarray(warped(jnp.asarray(_tone(1000)[None]), jnp.asarray([1.5])))[0]
  same = np.asarray(mfcc(jnp.asarray(_tone(1000)[None])))[0]
  target = np.asarray(mfcc(jnp.asarray(_tone(1500)[None])))[0]
  assert np.abs(w - target)[:, 1:].mean() < 0.3 * np.abs(w - same)[:, 1:].mean()


def test_features_are_normalised_gain_free_and_padding_free():
  rng = np.random.default_rng(0)
  wav = rng.normal(size=6000).astype(np.float32) * np.hanning(6000).astype(np.float32)
  batch = np.zeros((2, 9600), np.float32)
  batch[0, :6000] = wav
  batch[1, :6000] = 7.0 * wav  # a louder copy
  mask = np.zeros((2, 9600), bool)
  mask[:, :6000] = True
  features = jax.jit(pj.judge_features)  # eager: one compilation per primitive, slow
  x, fm = features(jnp.asarray(batch), jnp.asarray(mask))
  n = hubert.num_mfcc_frames(6000)
  assert fm.sum(-1).tolist() == [n, n]
  x = np.asarray(x)
  np.testing.assert_allclose(x[0, :n].mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(x[0, :n].std(0), 1.0, atol=1e-3)
  np.testing.assert_allclose(x[1, :n], x[0, :n], atol=2e-3)  # gain cancels
  assert np.all(x[:, n:] == 0.0)
  alone, _ = features(jnp.asarray(wav[None]), jnp.ones((1, 6000), bool))
  np.testing.assert_allclose(np.asarray(alone)[0], x[0, :n], atol=1e-4)


def small_config(**overrides):
  """experiments/phone_judge.py:tiny on the 400-utterance built-in corpus, a small model, one
  bucket, few steps."""
  from experiments import phone_judge as exp

  c = exp.get_config('tiny')
  settings = {
    'data.builtin_utterances': 400, 'data.batch_size': 8, 'data.num_samples': 60_000,
    'data.bucket_lengths': (), 'method.width': 48, 'method.dilations': (1, 2),
    'method.attention_layers': 1, 'method.ffn': 96, 'method.heads': 2,
    'optim.learning_rate': 3e-3, 'optim.warmup_steps': 3, 'train.num_steps': 30,
    'train.log_every': 5, 'train.checkpoint_every': 30, 'train.async_checkpointing': False,
    'evals': {}, **overrides}
  for key, value in settings.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _need_corpus():
  from data_pipelines import synth

  try:
    synth.check_tools(sorted({s.voice for s in synth.SPEAKERS.values()}))
  except RuntimeError as e:
    pytest.skip(str(e))


def test_loss_falls_on_a_fixed_batch_and_crops_are_left_out():
  from jaxspeech.train import data as data_lib
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  _need_corpus()
  # Fitting one batch: no augmentation, no dropout, a high constant rate.
  c = small_config(**{'method.warp': (), 'method.dropout': 0.0, 'optim.learning_rate': 1e-2,
                      'optim.schedule': 'constant', 'optim.warmup_steps': 0,
                      'data.batch_size': 4})
  method = pj.PhoneJudge(c)
  phones = method._need_phones()  # fitted on the manifest, as a fresh run does
  assert phones[0] == '_' and len(phones) == 42
  mesh = partitioning.create_mesh(c.mesh, devices=jax.devices()[:1])
  setup = step_lib.build_setup(c, method, mesh)
  state = step_lib.create_train_state(setup, jax.random.key(0))
  batch = data_lib.to_global(next(data_lib.make_iterator(c, mesh, method=method)), mesh)
  assert batch['frame_phones'].shape == (4, hubert.num_mfcc_frames(60_000))
  step = step_lib.jit_train_step(setup, batch)
  losses = []
  for _ in range(20):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert np.isfinite(losses).all()
  # From ~log(42) = 3.7 nats; 20 steps on one batch of 4 utterances fit it well below.
  assert losses[0] > 3.0 and losses[-1] < 0.6 * losses[0], losses
  assert float(m['frame_accuracy']) > 0.3 and float(m['used_fraction']) == 1.0
  # Rows the pipeline cropped (offset != 0) and filler rows carry no loss.
  crop = dict(batch, offset=jnp.asarray([0, 0, 0, 5], jnp.int32),
              valid=jnp.asarray([True, True, False, True]))
  _, m = step(state, crop)
  assert float(m['used_fraction']) == pytest.approx(2 / 4)


def test_posteriors_do_not_depend_on_padding():
  _need_corpus()
  c = small_config()
  method = pj.PhoneJudge(c)
  model, _ = method.init(jax.random.key(1))
  post = jax.jit(method.predict_fns(model, {})['phone_posteriors'])
  wav = np.random.default_rng(0).normal(size=20_000).astype(np.float32)
  outs = []
  for s in (20_000, 32_000):
    w = np.zeros((1, s), np.float32)
    w[0, :20_000] = wav
    lp, fm = post(jnp.asarray(w), jnp.asarray(np.arange(s)[None] < 20_000))
    outs.append(np.asarray(lp)[0, :int(fm.sum())])
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
  np.testing.assert_allclose(np.exp(outs[0]).sum(-1), 1.0, atol=1e-5)
  # transcribe pads to whole seconds in fixed batches: the same posteriors.
  ctx = types.SimpleNamespace(config=c, method=method, predict={'phone_posteriors': post})
  got = pj.phone_posteriors(ctx, [wav, wav[:9000]], normalize_gain='none', batch_size=4)
  np.testing.assert_allclose(got[0], outs[0], atol=1e-4)
  assert got[1].shape == (hubert.num_mfcc_frames(9000), len(method.phones))
  assert pj.input_normalization(ctx) == 'standard'
  assert pj.input_normalization(ctx, False) == 'none'
  with pytest.raises(ValueError, match='normalize_gain'):
    pj.input_normalization(ctx, 'loud')


def test_short_run_then_per_task_in_process_and_by_cli(tmp_path):
  from data_pipelines.manifest import read_manifest, write_manifest
  from data_pipelines.synth import built_in_corpus
  from jaxspeech import evaluate
  from jaxspeech.eval import per
  from jaxspeech.train.trainer import train_and_evaluate
  from jaxspeech.workdir import load_context

  _need_corpus()
  workdir = str(tmp_path / 'judge')
  c = small_config(**{'train.num_steps': 20, 'train.checkpoint_every': 20})
  train_and_evaluate(c, workdir)
  with open(f'{workdir}/host_state.json') as f:
    assert json.load(f)['phones'][0] == '_'
  # Scored on 8 short held-out utterances (one padded length: one compilation).
  rows = [r for r in read_manifest(built_in_corpus(num_utterances=400))
          if r['split'] == 'test' and r['n_samples'] <= 32_000][:8]
  manifest = str(tmp_path / 'short.jsonl')
  write_manifest(manifest, rows)
  ctx = load_context(workdir)
  assert 'phone_posteriors' in ctx.predict
  r = per.run(ctx, manifest=manifest, split='test')
  assert r['num_utterances'] == 8 and 0.0 < r['per'] < 3.0
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = evaluate.main(['--checkpoint', workdir, '--manifest', manifest, '--task', 'per',
                        '--split', 'test'])
  assert rc == 0
  assert json.loads(out.getvalue().strip().splitlines()[-1]) == pytest.approx(r)
