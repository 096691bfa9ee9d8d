"""CTC fine-tuning: loss vs a brute-force sum over alignments, decoding, vocabularies, label
gathering from the batch index, and a short run whose loss falls (then evaluated end to end)."""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.methods import ctc

SMALL_MODEL = {
  'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 128,
  'conv_dim': (64,) * 7, 'num_conv_pos_embeddings': 16, 'num_conv_pos_embedding_groups': 4,
}


def small_ctc_config(name='ctc', **overrides):
  """experiments/<name>.py:tiny with a 2-layer width-64 encoder, batch 4, few steps."""
  import importlib

  config = importlib.import_module(f'experiments.{name}').get_config('tiny')
  for k, v in SMALL_MODEL.items():
    config.model[k] = v
  settings = {'data.batch_size': 4, 'train.num_steps': 30, 'train.log_every': 5,
              'train.checkpoint_every': 30, 'train.async_checkpointing': False,
              'optim.warmup_steps': 5, 'method.freeze_encoder_steps': 10, **overrides}
  for key, value in settings.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _collapse(path):
  out, prev = [], None
  for p in path:
    if p != prev and p != 0:
      out.append(p)
    prev = p
  return out


def _brute_force_nll(logits, labels):
  """-log sum over all frame paths that collapse to `labels` of prod softmax (numpy)."""
  logp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
  t, v = logits.shape
  total = 0.0
  for path in itertools.product(range(v), repeat=t):
    if _collapse(path) == list(labels):
      total += np.exp(sum(logp[i, k] for i, k in enumerate(path)))
  return -np.log(total)


def test_ctc_loss_equals_sum_over_alignments():
  rng = np.random.default_rng(0)
  t, v = 5, 3
  logits = rng.normal(size=(4, t, v)).astype(np.float32) * 2
  labels = np.array([[1, 2, 0], [1, 1, 0], [2, 1, 2], [1, 0, 0]], np.int32)
  lengths = np.array([2, 2, 3, 1], np.int32)
  t_valid = np.array([5, 4, 5, 3])  # rows 1 and 3 have padded frames
  frame_mask = np.arange(t)[None, :] < t_valid[:, None]
  loss, feasible = ctc.ctc_loss(jnp.asarray(logits), jnp.asarray(frame_mask),
                                jnp.asarray(labels), jnp.asarray(lengths))
  want = [_brute_force_nll(logits[b, :t_valid[b]], labels[b, :lengths[b]]) for b in range(4)]
  np.testing.assert_allclose(np.asarray(loss), want, rtol=1e-5)
  assert np.asarray(feasible).tolist() == [True, True, True, True]


def test_ctc_loss_single_frame_and_feasibility():
  logits = jnp.asarray([[[0.3, -1.0, 2.0]]])  # T=1: the only path is the label itself
  loss, ok = ctc.ctc_loss(logits, jnp.ones((1, 1), bool), jnp.asarray([[2]]), jnp.asarray([1]))
  np.testing.assert_allclose(float(loss[0]), -float(jax.nn.log_softmax(logits[0, 0])[2]),
                             rtol=1e-6)
  assert bool(ok[0])
  # [1, 1] needs 3 frames (a blank between the repeats); 2 valid frames are infeasible.
  _, ok = ctc.ctc_loss(jnp.zeros((1, 4, 3)), jnp.asarray([[True, True, False, False]]),
                       jnp.asarray([[1, 1]]), jnp.asarray([2]))
  assert not bool(ok[0])


def test_greedy_decode_collapses_repeats_drops_blanks_and_padding():
  best = np.array([[0, 1, 1, 0, 1, 2, 2, 0], [3, 3, 0, 3, 2, 2, 1, 1]])
  mask = np.array([[True] * 8, [True] * 5 + [False] * 3])
  assert ctc.greedy_decode(best, mask) == [[1, 1, 2], [3, 3, 2]]


def test_tokens_and_vocab():
  assert ctc.char_tokens("Nine cold, cat's!") == list('nine') + ['|'] + list('cold') + ['|'] + \
    list("cat's")
  assert ctc.phone_tokens('n AI n _ k') == ['n', 'AI', 'n', 'k']
  v = ctc.build_vocab([{'phones': 'b a _'}, {'phones': 'a c'}], 'phone')
  assert v.tokens == ('<blank>', 'a', 'b', 'c')
  assert v.encode(['c', 'a']) == [3, 1]
  assert v.decode([0, 3, 0, 1]) == ['c', 'a']
  with pytest.raises(ValueError, match='not in the vocabulary'):
    v.encode(['z'])
  cv = ctc.build_vocab([], 'char')
  assert len(cv) == 29 and cv.tokens[0] == '<blank>'
  assert ctc.Vocab.to_text(ctc.char_tokens('  Hello   there ')) == 'hello there'


def test_label_table_leaves_out_long_or_unlabelled_rows():
  v = ctc.build_vocab([], 'char')
  rows = [{'text': 'ab', 'n_samples': 8000, 'sample_rate': 8000},  # 16000 at 16 kHz: fits
          {'text': 'abc', 'n_samples': 8001, 'sample_rate': 8000},  # 16002: would be cropped
          {'text': '', 'n_samples': 100, 'sample_rate': 16000}]
  table, lengths = ctc.label_table(rows, 'char', v, max_samples=16000)
  assert table.shape == (3, 3)
  assert lengths.tolist() == [2, -1, -1]
  assert table[0, :2].tolist() == v.encode(['a', 'b'])


def test_host_fields_and_targets_drop_fillers_and_crops():
  config = small_ctc_config()
  method = ctc.CtcFinetuning(config)
  rows = method.training_rows()
  method.set_host_state(method.fit_host_state(rows))
  table, lengths = ctc.label_table(rows, 'phone', method.vocab, int(config.data.num_samples))
  assert table.shape[1] == method.max_label_length
  fields = [method.host_fields(r) for r in rows[:3]]
  for i, f in enumerate(fields):
    np.testing.assert_array_equal(f['labels'], table[i])
    assert int(f['label_length']) == lengths[i]
  spec = method.batch_spec(config)
  assert spec['labels'].shape == (int(config.data.batch_size), method.max_label_length)
  batch = {'index': jnp.asarray([0, 1, -1, 2]), 'valid': jnp.asarray([True, True, False, True]),
           'offset': jnp.asarray([0, 0, 0, 160]),
           'labels': jnp.asarray(np.stack([fields[0]['labels'], fields[1]['labels'], table[0],
                                           fields[2]['labels']])),
           'label_length': jnp.asarray([lengths[0], lengths[1], 0, lengths[2]])}
  labels, got = jax.jit(method.targets)(batch)
  np.testing.assert_array_equal(labels[:2], table[:2])
  assert np.asarray(got).tolist() == [int(lengths[0]), int(lengths[1]), -1, -1]


def test_vocabulary_is_host_state_never_refitted_from_the_manifest(tmp_path):
  """The trainer writes host_state.json once; set_host_state needs it (no manifest fallback)."""
  from jaxspeech.train.trainer import bind_host_state

  config = small_ctc_config()
  method = ctc.CtcFinetuning(config)
  state = bind_host_state(config, method, str(tmp_path))
  with open(tmp_path / 'host_state.json') as f:
    assert json.load(f) == state
  assert state['tokens'] == list(method.vocab.tokens[1:]) and state['unit'] == 'phone'
  # A later start reads the file, whatever the manifest now says.
  edited = dict(state, tokens=state['tokens'][::-1])
  with open(tmp_path / 'host_state.json', 'w') as f:
    json.dump(edited, f)
  again = ctc.CtcFinetuning(config)
  bind_host_state(config, again, str(tmp_path))
  assert list(again.vocab.tokens[1:]) == edited['tokens']
  with pytest.raises(ValueError, match='host_state.json'):
    ctc.CtcFinetuning(config).set_host_state({})


def test_short_ctc_run_loss_falls_and_evaluates(tmp_path):
  from jaxspeech.train.trainer import train_and_evaluate
  from jaxspeech.workdir import evaluate_ctc

  workdir = str(tmp_path / 'ctc')
  config = small_ctc_config()
  train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logs = [json.loads(line) for line in f if line.strip()]
  losses = [r['ctc_loss'] for r in logs if 'ctc_loss' in r]
  assert len(losses) == 6
  assert losses[-1] < 0.7 * losses[0], losses
  from data_pipelines.synth import built_in_corpus
  manifest = built_in_corpus(num_utterances=400)
  r = evaluate_ctc(workdir, manifest, split='test')
  assert set(r) == {'per'}
  assert 0.0 <= r['per'] < 10.0
  # The CLI gives the same numbers.
  import contextlib
  import io

  from jaxspeech import evaluate
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = evaluate.main(['--checkpoint', workdir, '--manifest', manifest, '--task', 'ctc',
                        '--split', 'test'])
  assert rc == 0
  assert json.loads(out.getvalue().strip().splitlines()[-1]) == r
