"""`python -m jaxspeech.evaluate` on a small synthetic corpus: every task from the MFCC baseline,
a jaxspeech DinoSR workdir (k-means and its own codebook units), a Spin workdir (its units) and an
HF checkpoint directory, plus the error cases (exit code 2 with one line naming the problem)."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from jaxspeech import evaluate
from jaxspeech import workdir as workdir_lib
from jaxspeech.eval import common
from jaxspeech.eval import units as units_lib

SMALL_MODEL = {
  'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 64,
  'conv_dim': (32,) * 7, 'num_conv_pos_embeddings': 16, 'num_conv_pos_embedding_groups': 4,
}


def synth_corpus(tmp_path_factory, voices, n, seed):
  """A synthetic corpus of `n` utterances by `voices` (skips without espeak-ng / MBROLA)."""
  from data_pipelines import synth

  try:
    synth.check_tools(synth.SPEAKERS[v].voice for v in voices)
  except RuntimeError as e:
    pytest.skip(str(e))
  return synth.synthesize_corpus(tmp_path_factory.mktemp('synth') / 'c', n, seed=seed,
                                 voices=voices)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """20 utterances, 4 speakers, with alignments."""
  return synth_corpus(tmp_path_factory, ['us1', 'us2', 'us3', 'en1'], 20, seed=3)


@pytest.fixture(scope='module')
def workdir(corpus, tmp_path_factory):
  """A DinoSR workdir: 6 steps of a 2-layer model, checkpointed at the end."""
  from experiments import dinosr as exp
  from jaxspeech.train import trainer

  c = exp.get_config('tiny')
  for k, v in SMALL_MODEL.items():
    c.model[k] = v
  c.data.manifest = corpus
  c.data.split = ''
  c.data.num_samples = 8000
  c.method.average_top_k_layers = 2
  c.method.codebook_size = 16
  c.train.num_steps = 6
  c.train.checkpoint_every = 6
  c.train.log_every = 3
  c.train.async_checkpointing = False
  c.optim.warmup_steps = 2
  wd = str(tmp_path_factory.mktemp('dinosr_wd'))
  trainer.train_and_evaluate(c, wd)
  return wd


def run_cli(capsys, *args):
  rc = evaluate.main(list(args))
  out, err = capsys.readouterr()
  return rc, out, err


def check_units(r):
  assert set(r) == {'pnmi', 'phone_purity', 'cluster_purity', 'speaker_nmi'}  # corpus: 4 speakers
  assert 0.0 < r['pnmi'] < 1.0 and 0.0 <= r['speaker_nmi'] < 1.0
  assert 0.0 < r['phone_purity'] <= 1.0 and 0.0 < r['cluster_purity'] <= 1.0


def test_mfcc_every_task(corpus, capsys):
  rc, out, _ = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', corpus, '--task', 'units',
                       '--k', '20')
  assert rc == 0
  units = json.loads(out.strip())
  check_units(units)
  # 20 clusters of MFCCs carry a good part of the phone information of clean synthetic speech.
  assert units['pnmi'] > 0.15
  # MFCC speaker information: the 4 voices differ in pitch / formants, units reveal part of it.
  assert units['speaker_nmi'] > 0.05
  rc, out, _ = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', corpus, '--task', 'units',
                       '--k', '20', '--standardize')  # z-scored dimensions: other clusters
  assert rc == 0
  std = json.loads(out.strip())
  check_units(std)
  assert std['pnmi'] != units['pnmi']
  rc, out, _ = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', corpus, '--task', 'abx')
  assert rc == 0
  abx = json.loads(out.strip())
  assert set(abx) == {'abx_within', 'abx_across'}
  assert 0.0 <= abx['abx_within'] < 50.0 and 0.0 <= abx['abx_across'] < 50.0
  rc, out, _ = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', corpus, '--task',
                       'speaker_probe')
  assert rc == 0
  probe = json.loads(out.strip())
  assert set(probe) == {'accuracy', 'train_accuracy', 'C', 'chance', 'majority_baseline',
                        'num_speakers', 'num_train', 'num_test', 'frame_accuracy',
                        'frame_train_accuracy', 'frame_C', 'frame_majority_baseline'}
  assert probe['accuracy'] > 0.5 and probe['chance'] == 0.25 and probe['num_speakers'] == 4
  assert probe['frame_accuracy'] > 0.25


def test_mfcc_input_scale(capsys, tmp_path):
  """`--mfcc_input_scale kaldi`: the waveform x 32768 (c0 up by sqrt(23) log(32768^2) where no
  mel bin is floored, as for this noisy tone); an error with any other checkpoint."""
  t = np.arange(16000) / 16000
  wav = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * np.random.default_rng(0).normal(size=16000))
  wav, mask = wav[None].astype(np.float32), np.ones((1, 16000), bool)
  fairseq = np.asarray(workdir_lib.load_context('mfcc').predict['features'](wav, mask)[0])[0]
  ctx = workdir_lib.load_context('mfcc', mfcc_input_scale='kaldi')
  kaldi = np.asarray(ctx.predict['features'](wav, mask)[0])[0]  # [T, 39]
  np.testing.assert_allclose(kaldi[:, 0] - fairseq[:, 0], np.sqrt(23) * np.log(32768.0 ** 2),
                             rtol=1e-4)
  np.testing.assert_allclose(kaldi[:, 1:], fairseq[:, 1:], atol=2e-3)
  manifest = tmp_path / 'm.jsonl'
  manifest.write_text('')
  rc, _, err = run_cli(capsys, '--checkpoint', str(tmp_path), '--manifest', str(manifest),
                       '--task', 'abx', '--mfcc_input_scale', 'kaldi')
  assert rc == 2 and '--mfcc_input_scale applies to --checkpoint mfcc only' in err
  with pytest.raises(SystemExit) as e:  # argparse's own usage error
    evaluate.main(['--checkpoint', 'mfcc', '--manifest', str(manifest), '--task', 'abx',
                   '--mfcc_input_scale', 'int16'])
  assert e.value.code == 2 and "invalid choice: 'int16'" in capsys.readouterr().err


def test_workdir_every_task_and_codebook(corpus, workdir, capsys):
  for layer in ('last', '1'):
    rc, out, err = run_cli(capsys, '--checkpoint', workdir, '--manifest', corpus, '--task',
                           'units', '--layer', layer, '--k', '10')
    assert rc == 0, err
    check_units(json.loads(out))
  # Layers 1..2 carry codebooks (top 2 of 2).
  rc, out, err = run_cli(capsys, '--checkpoint', workdir, '--manifest', corpus, '--task', 'units',
                         '--layer', 'last', '--codebook')
  assert rc == 0, err
  check_units(json.loads(out))
  rc, out, err = run_cli(capsys, '--checkpoint', workdir, '--manifest', corpus, '--task', 'abx',
                         '--layer', '2')
  assert rc == 0, err
  abx = json.loads(out)
  assert all(0.0 <= abx[k] <= 100.0 for k in abx) and not any(math.isnan(v) for v in abx.values())
  rc, out, err = run_cli(capsys, '--checkpoint', os.path.relpath(workdir), '--manifest', corpus,
                         '--task', 'speaker_probe', '--layer', '0')  # a relative path works too
  assert rc == 0, err
  assert 0.0 <= json.loads(out)['accuracy'] <= 1.0
  # The codebooks are the trained ones (counts start at 1; used codewords' counts moved).
  from flax import nnx

  from jaxspeech.methods import dinosr
  from jaxspeech.train.checkpoint import load_workdir_model

  ctx = workdir_lib.load_context(workdir)
  counts = np.asarray(dinosr.stacked_codebooks(ctx.extra['codebooks']).counts)  # [K, V]
  assert counts.shape == (2, 16) and (counts != 1.0).any() and (counts == 1.0).any()
  # 'units' run the EMA teacher's transformer (the codebooks' source); the model and its
  # 'features' stay the student's, the checkpoint's parameters.
  teacher = ctx.extra['teacher']
  flat = lambda m: jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  with_cb = dinosr.teacher_encoder(ctx.model, teacher).encoder
  student = ctx.model.encoder.encoder
  _, saved, _, _ = load_workdir_model(workdir)
  assert all(np.array_equal(a, b) for a, b in zip(flat(with_cb), jax.tree.leaves(teacher)))
  assert any(not np.array_equal(a, b) for a, b in zip(flat(with_cb), flat(student)))
  assert all(np.array_equal(a, b) for a, b in zip(flat(student), flat(saved.encoder.encoder)))
  # Layer 0 (the transformer input) has no codebook.
  rc, _, err = run_cli(capsys, '--checkpoint', workdir, '--manifest', corpus, '--task', 'units',
                       '--layer', '0', '--codebook')
  assert rc == 2 and 'no codebook' in err


def test_hf_checkpoint_dir(corpus, tmp_path, capsys):
  from flax import nnx

  from jaxspeech.interop import hf
  from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder

  model = SpeechEncoder(EncoderConfig.preset('tiny', **SMALL_MODEL), rngs=nnx.Rngs(0))
  hf.save_hf_checkpoint(model, tmp_path / 'hf')
  rc, out, err = run_cli(capsys, '--checkpoint', str(tmp_path / 'hf'), '--manifest', corpus,
                         '--task', 'units', '--layer', '-1', '--k', '8')
  assert rc == 0, err
  check_units(json.loads(out))
  rc, _, err = run_cli(capsys, '--checkpoint', str(tmp_path / 'hf'), '--manifest', corpus,
                       '--task', 'units', '--codebook')
  assert rc == 2 and 'codebook' in err


def _gain_offset_gap(ctx, layer):
  """max |features(3 w + 0.1) - features(w)| through `layer_outputs` (the evaluate path)."""
  w = np.random.default_rng(0).uniform(-0.5, 0.5, 12000).astype(np.float32)  # [S]
  a, b = common.layer_outputs(ctx, [w, 3.0 * w + 0.1], layer)
  assert a.shape == b.shape and np.abs(a).max() > 0.1
  return float(np.abs(a - b).max())


def test_encoder_input_normalised_as_in_training(tmp_path):
  """HF dirs: normalised per utterance unless preprocessor_config.json says do_normalize=false;
  MFCCs: raw. (Workdirs: `test_workdir_input_normalised`.)"""
  import shutil

  from flax import nnx

  from jaxspeech.interop import hf
  from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder

  # Large-style CNN (LayerNorm over channels per frame, conv bias): unlike the base GroupNorm
  # over time, it is not itself nearly invariant to input gain and offset.
  cfg = EncoderConfig.preset('tiny', **SMALL_MODEL, feat_extract_norm='layer', conv_bias=True)
  hf.save_hf_checkpoint(SpeechEncoder(cfg, rngs=nnx.Rngs(0)), tmp_path / 'hf')
  shutil.copytree(tmp_path / 'hf', tmp_path / 'hf_raw')
  with open(tmp_path / 'hf_raw' / 'preprocessor_config.json', 'w') as f:
    json.dump({'do_normalize': False}, f)
  normed = workdir_lib.load_context(str(tmp_path / 'hf'))
  raw = workdir_lib.load_context(str(tmp_path / 'hf_raw'))
  assert normed.normalize and not raw.normalize and not workdir_lib.load_context('mfcc').normalize
  assert _gain_offset_gap(normed, 2) <= 1e-5
  assert _gain_offset_gap(raw, 2) > 1e-2


def test_workdir_input_normalised(workdir):
  ctx = workdir_lib.load_context(workdir)
  assert ctx.normalize
  assert _gain_offset_gap(ctx, common.num_layers(ctx)) <= 1e-5


def test_errors(corpus, tmp_path, capsys):
  rc, out, err = run_cli(capsys, '--checkpoint', str(tmp_path / 'nope'), '--manifest', corpus,
                         '--task', 'units')
  assert rc == 2 and out == '' and 'no such directory' in err
  rc, _, err = run_cli(capsys, '--checkpoint', str(tmp_path), '--manifest', corpus,
                       '--task', 'units')
  assert rc == 2 and 'neither' in err
  # A manifest without alignments: fine for the speaker probe, an error for units and abx.
  rows = [json.loads(line) for line in open(corpus)]
  bare = tmp_path / 'bare.jsonl'
  with open(bare, 'w') as f:
    for r in rows:
      r.pop('alignment', None)
      r['path'] = os.path.join(os.path.dirname(corpus), r['path'])
      f.write(json.dumps(r) + '\n')
  for task in ('units', 'abx'):
    rc, _, err = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', str(bare), '--task', task)
    assert rc == 2 and 'alignment' in err
  rc, out, _ = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', str(bare), '--task',
                       'speaker_probe')
  assert rc == 0 and 'accuracy' in json.loads(out)
  rc, _, err = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', str(tmp_path / 'x.jsonl'),
                       '--task', 'abx')
  assert rc == 2 and 'no such file' in err
  rc, _, err = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', corpus, '--task', 'units',
                       '--split', 'nosuchsplit')
  assert rc == 2 and 'nosuchsplit' in err


def test_workdir_errors_name_the_checkpoint_given(corpus, workdir, tmp_path, capsys):
  """A workdir that does not load is reported in one line naming `--checkpoint` as the user gave
  it, never `config.init_from` (a key this command does not have); a shape mismatch lists the
  mis-shaped parameters only, not also as missing."""
  import shutil

  bad = tmp_path / 'changed_model'
  shutil.copytree(workdir, bad)
  cfg = json.loads((bad / 'config.json').read_text())
  cfg['model']['intermediate_size'] = 128  # the checkpoint has 64
  (bad / 'config.json').write_text(json.dumps(cfg))
  rc, out, err = run_cli(capsys, '--checkpoint', str(bad), '--manifest', corpus, '--task', 'units')
  lines = [line for line in err.splitlines() if 'error:' in line]
  assert rc == 2 and out == '' and len(lines) == 1 and 'Traceback' not in err, err
  assert f'--checkpoint {bad}' in lines[0] and 'init_from' not in err
  assert 'shape mismatch (6 of' in lines[0] and 'intermediate_dense' in lines[0]
  assert 'missing' not in lines[0]
  (bad / 'config.json').write_text('{"model": ')  # truncated
  rc, _, err = run_cli(capsys, '--checkpoint', str(bad), '--manifest', corpus, '--task', 'units')
  assert rc == 2 and 'not valid JSON' in err and str(bad / 'config.json') in err
  assert 'Traceback' not in err


def test_subprocess_entry_point(corpus):
  """The module runs as `python -m jaxspeech.evaluate` and prints exactly one JSON line."""
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  p = subprocess.run([sys.executable, '-m', 'jaxspeech.evaluate', '--checkpoint', 'mfcc',
                      '--manifest', corpus, '--task', 'speaker_probe'], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  lines = [line for line in p.stdout.splitlines() if line.strip()]
  assert len(lines) == 1 and 'accuracy' in json.loads(lines[0])
  p = subprocess.run([sys.executable, '-m', 'jaxspeech.evaluate', '--checkpoint', '/no/such',
                      '--manifest', corpus, '--task', 'abx'], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2 and 'error:' in p.stderr




@pytest.fixture(scope='module')
def split_corpus(tmp_path_factory):
  """16 utterances: 2 training voices and the 2 held-out (split "test") voice variants."""
  from data_pipelines import synth

  return synth_corpus(tmp_path_factory, ['us1', 'en1', *synth.HELD_OUT], 16, seed=4)


def test_units_fit_split(split_corpus, capsys):
  """`--fit_split train`: k-means fitted on the training speakers' frames labels the held-out
  ones (fairseq's protocol); fitting on the evaluated rows themselves is the default."""
  from jaxspeech.audio import load_audio
  from jaxspeech.models.speech_encoder import EncoderConfig

  rows = common.load_rows(split_corpus, 'test', need_alignment=True)
  wavs = [load_audio(r['path']) for r in rows]
  x = workdir_lib.load_context('mfcc')
  transductive = units_lib.evaluate_units(x, wavs, rows, 0, 12)
  # Fitting on exactly the evaluated utterances is the default path, number for number.
  assert units_lib.evaluate_units(x, wavs, rows, 0, 12, fit_wavs=wavs) == transductive
  train_wavs = [load_audio(r['path']) for r in common.load_rows(split_corpus, 'train')]
  inductive, units = units_lib.evaluate_units(x, wavs, rows, 0, 12, fit_wavs=train_wavs,
                                              return_units=True)
  check_units(inductive)
  assert inductive['pnmi'] != transductive['pnmi']
  mfcc_frames = EncoderConfig.preset('tiny').num_frames  # 20 ms hop, 25 ms window
  assert [len(u) for u in units] == [mfcc_frames(len(w)) for w in wavs]

  rc, out, _ = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', split_corpus, '--task',
                       'units', '--k', '12', '--split', 'test', '--fit_split', 'train')
  assert rc == 0 and json.loads(out.strip()) == pytest.approx(inductive)
  rc, _, err = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', split_corpus, '--task',
                       'units', '--split', 'test', '--fit_split', 'nosuchsplit')
  assert rc == 2 and "split='nosuchsplit'" in err
  rc, _, err = run_cli(capsys, '--checkpoint', 'mfcc', '--manifest', split_corpus, '--task', 'abx',
                       '--fit_split', 'train')
  assert rc == 2 and '--fit_split' in err


@pytest.fixture(scope='module')
def spin_workdir(tmp_path_factory):
  from tests.test_extract_units import make_spin_workdir

  return make_spin_workdir(tmp_path_factory.mktemp('spin_wd'))[0]


@pytest.mark.slow  # default run < 20 min on 2 cores; test_extract_units checks units
def test_spin_units(corpus, spin_workdir, capsys):
  """`--units` (alias `--codebook`) scores Spin's own units: `SpinModel.units` of every
  normalised utterance, computed here one utterance at a time."""
  from jaxspeech.audio import load_audio, normalize_waveform
  from jaxspeech.train.checkpoint import load_workdir_model

  rc, out, err = run_cli(capsys, '--checkpoint', spin_workdir, '--manifest', corpus, '--task',
                         'units', '--units')
  assert rc == 0, err
  got = json.loads(out)
  check_units(got)
  _, model, _, _ = load_workdir_model(spin_workdir)
  units_fn = jax.jit(model.units)
  rows = common.load_rows(corpus, need_alignment=True)
  units = []
  for r in rows:
    w = normalize_waveform(load_audio(r['path']))
    s = -(-len(w) // 16000) * 16000  # whole seconds, as evaluate pads (exact in the encoder)
    wav, mask = np.zeros((1, s), np.float32), np.zeros((1, s), bool)
    wav[0, :len(w)], mask[0, :len(w)] = w, True
    ids, frame_mask = units_fn(wav, mask)
    units.append(np.asarray(ids)[0, :int(np.sum(frame_mask))])
  assert got == units_lib.score_units(units, rows)
  rc, out2, err = run_cli(capsys, '--checkpoint', spin_workdir, '--manifest', corpus, '--task',
                          'units', '--codebook')  # the old flag
  assert rc == 0 and json.loads(out2) == got
  # Spin's units come from its last layer only.
  rc, _, err = run_cli(capsys, '--checkpoint', spin_workdir, '--manifest', corpus, '--task',
                       'units', '--units', '--layer', '1')
  assert rc == 2 and 'last layer' in err


def test_dinosr_units_extract_equals_evaluate(corpus, workdir, tmp_path, capsys):
  """`jaxspeech.extract --units --layers L` gives the units `evaluate --task units --units
  --layer L` scores (both the method's 'units' prediction)."""
  from jaxspeech import extract

  rows = common.load_rows(corpus, need_alignment=True)
  out = tmp_path / 'u.npz'
  assert extract.main(['--checkpoint', workdir, '--audio', *[r['path'] for r in rows], '--units',
                       '--layers', '1', '--out', str(out)]) == 0
  capsys.readouterr()
  ids = np.load(out)
  units = [ids[os.path.splitext(os.path.basename(r['path']))[0]] for r in rows]
  rc, res, err = run_cli(capsys, '--checkpoint', workdir, '--manifest', corpus, '--task', 'units',
                         '--units', '--layer', '1')
  assert rc == 0, err
  assert json.loads(res) == units_lib.score_units(units, rows)
  # DinoSR's units need a target layer: all layers at once is an error.
  assert extract.main(['--checkpoint', workdir, '--audio', rows[0]['path'], '--units',
                       '--out', str(tmp_path / 'all.npz')]) == 2
  assert 'no codebook' in capsys.readouterr().err


@pytest.mark.parametrize('target_output', ['ffn', 'block'])
def test_dinosr_predicted_units_are_the_training_targets(target_output):
  """DinoSR's 'units' prediction of a target layer equals the targets the loss assigns to that
  layer (teacher on unmasked input, FFN or block outputs, instance norm, nearest codeword), with
  a teacher that differs from the student; its 'features' stay the student's."""
  import jax.numpy as jnp

  from jaxspeech.methods import dinosr
  from jaxspeech.models.encoders import layer_features
  from tests.methods.test_dinosr import batch, small_config

  method = dinosr.DinosrPretraining(small_config(target_output=target_output))
  model, extra = method.init(jax.random.key(0))
  teacher = jax.tree.map(lambda w: w + 0.05 * jnp.sin(jnp.arange(w.size).reshape(w.shape) + 1.0),
                         extra['teacher'])  # a teacher != the student
  extra = {**extra, 'teacher': teacher}
  b = batch()
  x, _, frame_mask = model.encoder.embed(b['audio'], b['audio_mask'])
  outs = dinosr.run_teacher(model, teacher, x, frame_mask, method.num_layers, target_output)
  targets = dinosr.dinosr_targets(outs, frame_mask, method.k)  # [K, B, T, D]
  codes, _ = dinosr.assign_and_update(extra['codebooks'], targets, frame_mask, 0.9)  # [K, B, T]
  predict = method.predict_fns(model, extra)
  valid = np.asarray(frame_mask)
  first = method.num_layers - method.k + 1
  for i, layer in enumerate(range(first, method.num_layers + 1)):
    ids, fmask = jax.jit(lambda w, m, layer=layer: predict['units'](w, m, layer))(
      b['audio'], b['audio_mask'])
    np.testing.assert_array_equal(np.asarray(fmask), valid)
    np.testing.assert_array_equal(np.asarray(ids)[valid], np.asarray(codes[i])[valid])
  with pytest.raises(ValueError, match=f'the target layers are {first}..{method.num_layers}'):
    predict['units'](b['audio'], b['audio_mask'], first - 1)
  with pytest.raises(ValueError, match='no codebook'):
    predict['units'](b['audio'], b['audio_mask'])  # no layer
  feats, _ = predict['features'](b['audio'], b['audio_mask'], method.num_layers)
  ref, _ = layer_features(model.encoder, b['audio'], b['audio_mask'], method.num_layers)
  np.testing.assert_array_equal(np.asarray(feats), np.asarray(ref))
  teacher_feats, _ = layer_features(dinosr.teacher_encoder(model, teacher), b['audio'],
                                    b['audio_mask'], method.num_layers)
  assert np.abs(np.asarray(teacher_feats) - np.asarray(ref)).max() > 1e-3
