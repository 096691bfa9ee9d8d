"""The command lines `evaluate`, `extract`, `prune`, `w2vu` and `demo`: a user error (a flag, a
config key, a path, a checkpoint) prints ONE line `PROG: error: ...` naming it and exits with
code 2; nothing is written then. Every fault is injected for real (bad flags, garbage files);
none of these tests trains or compiles a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from jaxspeech import errors, evaluate, extract, w2vu
from jaxspeech.interop import hf
from jaxspeech.models import params as params_lib
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_MODEL = {
  'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2, 'intermediate_size': 64,
  'conv_dim': (32,) * 7, 'num_conv_pos_embeddings': 16, 'num_conv_pos_embedding_groups': 4,
}


def one_error_line(err: str, prog: str) -> str:
  """The single `PROG: error:` line of `err` (absl / Orbax log lines aside); no traceback."""
  assert 'Traceback' not in err, err
  lines = [line for line in err.splitlines() if 'error:' in line]
  assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), err
  return lines[0]


def run_module(module: str, *args: str, timeout: int = 120):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# evaluate (issue 22, case 12) and extract (case 13).


@pytest.mark.parametrize('k,why', [('0', 'must be >= 1, got 0'), ('-3', 'must be >= 1, got -3'),
                                   ('two', "expected a positive integer, got 'two'")])
def test_evaluate_k_must_be_positive(k, why, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate.main(['--checkpoint', 'mfcc', '--manifest', 'm.jsonl', '--task', 'units', '--k', k])
  assert e.value.code == 2
  assert f'argument --k: {why}' in one_error_line(capsys.readouterr().err, evaluate.PROG)


def test_evaluate_workdir_with_garbage_config_names_the_checkpoint(tmp_path, capsys):
  wd = tmp_path / 'run'
  (wd / 'checkpoints').mkdir(parents=True)
  (wd / 'config.json').write_text('not json {')
  assert evaluate.main(['--checkpoint', str(wd), '--task', 'units']) == 2
  line = one_error_line(capsys.readouterr().err, evaluate.PROG)
  assert f'--checkpoint {wd}:' in line and 'config.json is not valid JSON' in line
  assert 'init_from' not in line


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('hf') / 'small'
  hf.save_hf_checkpoint(SpeechEncoder(EncoderConfig.preset('tiny', **SMALL_MODEL),
                                      rngs=nnx.Rngs(0)), path)
  return path


@pytest.fixture()
def garbage_hf(hf_dir, tmp_path):
  import shutil

  path = tmp_path / 'hf_bad'
  shutil.copytree(hf_dir, path)
  return path


@pytest.mark.parametrize('config,why', [
  ('this is not JSON', 'not valid JSON'),
  ('[1, 2]', 'not an HF model config'),
  ('{"hidden_size": 32}',
   "model_type None is not a wav2vec2/hubert/wavlm/data2vec-audio checkpoint"),
  # keys missing: HF's defaults (12 heads) do not fit the 32 dims given
  ('{"model_type": "hubert", "hidden_size": 32}', 'describes no valid encoder'),
  ('{"model_type": "hubert", "feat_extract_norm": "batch"}', 'feat_extract_norm'),
  ('{"model_type": "hubert", "add_adapter": true}', 'add_adapter=True is not supported'),
])
def test_extract_garbage_hf_config_names_the_file(garbage_hf, tmp_path, capsys, config, why):
  (garbage_hf / 'config.json').write_text(config)
  out = tmp_path / 'f.npz'
  assert extract.main(['--checkpoint', str(garbage_hf), '--audio', 'a.wav', '--out',
                       str(out)]) == 2
  line = one_error_line(capsys.readouterr().err, extract.PROG)
  assert f'{garbage_hf / "config.json"}:' in line and why in line, line
  assert not out.exists()


def test_hf_shape_mismatch_is_not_also_missing(hf_dir, garbage_hf, capsys):
  cfg = json.loads((hf_dir / 'config.json').read_text())
  cfg['intermediate_size'] = 128  # the weights have 64
  (garbage_hf / 'config.json').write_text(json.dumps(cfg))
  assert extract.main(['--checkpoint', str(garbage_hf), '--audio', 'a.wav', '--out',
                       'f.npz']) == 2
  line = one_error_line(capsys.readouterr().err, extract.PROG)
  assert f'{garbage_hf}: the weights do not match' in line
  assert 'shape mismatches (6)' in line and 'and 1 more' in line
  assert 'missing' not in line and 'unknown' not in line
  (garbage_hf / 'model.safetensors').write_bytes(b'garbage')
  (garbage_hf / 'config.json').write_text((hf_dir / 'config.json').read_text())
  assert extract.main(['--checkpoint', str(garbage_hf), '--audio', 'a.wav', '--out',
                       'f.npz']) == 2
  line = one_error_line(capsys.readouterr().err, extract.PROG)
  assert f'{garbage_hf / "model.safetensors"}: not a readable safetensors file' in line


def test_check_same_tree_reports_shapes_apart_from_missing_keys():
  want = {'a': {'w': np.zeros((2, 3)), 'b': np.zeros(3)}, 'c': np.zeros(4), 'd': np.zeros(1)}
  have = {'a': {'w': np.zeros((2, 5)), 'b': np.zeros(3)}, 'c': np.zeros(4), 'e': np.zeros(1)}
  with pytest.raises(params_lib.ParamsMismatchError) as e:
    params_lib.check_same_tree(want, have, '--checkpoint W')
  msg = str(e.value)
  assert isinstance(e.value, ValueError) and errors.is_user_error(e.value)
  assert msg.startswith('--checkpoint W: ') and '\n' not in msg
  assert 'shape mismatch (1 of 4): a/w want (2, 3) have (2, 5)' in msg
  assert 'missing (1): d' in msg and 'unexpected (1): e' in msg
  assert msg.count('a/w') == 1 and 'a/b' not in msg  # mis-shaped: not also missing/unexpected


def test_extract_out_is_checked_before_the_work(hf_dir, tmp_path, capsys):
  (tmp_path / 'feats').mkdir()
  assert extract.main(['--checkpoint', str(hf_dir), '--audio', 'a.wav', '--out',
                       str(tmp_path / 'feats')]) == 2
  line = one_error_line(capsys.readouterr().err, extract.PROG)
  assert '--out' in line and 'is a directory' in line
  assert extract.main(['--checkpoint', str(tmp_path / 'nope'), '--audio', 'a.wav', '--out',
                       str(tmp_path / 'f.npz')]) == 2
  assert 'no such directory' in one_error_line(capsys.readouterr().err, extract.PROG)
  with pytest.raises(SystemExit) as e:
    extract.main(['--checkpoint', str(hf_dir), '--audio', 'a.wav', '--out', 'f.npz',
                  '--batch-size', '0'])
  assert e.value.code == 2
  assert not list(tmp_path.glob('f.npz*'))


def test_extract_writes_exactly_the_path_given(tmp_path):
  feats = {'a/layer_0': np.arange(6, dtype=np.float32).reshape(2, 3)}
  out = tmp_path / 'feats.bin'
  assert extract.write_output(str(out), feats) == str(out)
  assert sorted(os.listdir(tmp_path)) == ['feats.bin']  # no feats.bin.npz, no temporary file
  np.testing.assert_array_equal(np.load(out)['a/layer_0'], feats['a/layer_0'])
  units = {'a': np.array([3, 1, 2], np.int32)}
  assert extract.write_output(str(tmp_path / 'u.txt'), units, units_text=True)
  assert (tmp_path / 'u.txt').read_text() == 'a 3 1 2\n'


# ---------------------------------------------------------------------------------------------
# w2vu (argparse, in process) and the absl command lines (prune, demo; as subprocesses).


@pytest.mark.parametrize('args,why', [
  (['--inputs', 'ssl,wav'], "--inputs 'ssl,wav': unknown input(s) ['wav']"),
  (['--seeds', '0,x'], "--seeds '0,x': expected comma-separated integers"),
  (['--set', 'method.no_such=1'], "config has no field 'method.no_such'"),
  (['--set', 'method.code_penalty=abc'], 'method.code_penalty is a float'),
  (['--encoder', '/no/such/encoder'], '--encoder /no/such/encoder: no such directory'),
])
def test_w2vu_flags_checked_before_any_stage(tmp_path, capsys, args, why):
  wd = tmp_path / 'study'
  assert w2vu.main(['run', '--workdir', str(wd), *args]) == 2
  assert why in one_error_line(capsys.readouterr().err, w2vu.PROG)
  assert not wd.exists()  # nothing started


def test_w2vu_set_keeps_its_exception_types():
  from jaxspeech.demo import experiment_config

  c = experiment_config('w2vu2', 'tiny')
  with pytest.raises(KeyError, match='method.no_such') as e:
    w2vu.apply_overrides(c, ['method.no_such=1'])
  assert str(e.value).startswith("--set 'method.no_such=1'")  # not quoted as KeyError does
  with pytest.raises(ValueError, match='KEY=VALUE'):
    w2vu.apply_overrides(c, ['method.code_penalty'])


@pytest.mark.parametrize('args,why', [
  (['--config.prune.sparsityy=0.7'],
   "--config.prune.sparsityy: the config has no field 'sparsityy' (did you mean 'sparsity'?)"),
  (['--config.prune.method=lth'], "config.prune.method='lth': choose one of"),
  (['--config.prune.sparsity=1.5'], 'config.prune.sparsity=1.5: must be in [0, 1)'),
])
def test_prune_config_errors_are_one_line(tmp_path, args, why):
  wd = tmp_path / 'run'
  p = run_module('jaxspeech.prune', '--config', 'experiments/parp.py:tiny', '--workdir', str(wd),
                 *args)
  assert p.returncode == 2, p.stderr[-3000:]
  assert why in one_error_line(p.stderr, 'python -m jaxspeech.prune')
  assert not wd.exists()


def test_prune_missing_config_file_is_one_line(tmp_path):
  p = run_module('jaxspeech.prune', '--config', 'experiments/no_such.py:tiny', '--workdir',
                 str(tmp_path / 'run'))
  assert p.returncode == 2, p.stderr[-3000:]
  line = one_error_line(p.stderr, 'python -m jaxspeech.prune')
  assert '--config experiments/no_such.py: no such file' in line


@pytest.mark.parametrize('args,why', [
  (['--spin_steps', '0'], '--spin_steps 0: must be >= 1'),
  (['--spin_steps', 'many'], "flag --spin_steps=many: invalid literal for int()"),
  (['--pretrained', '/no/such/run'], '--pretrained /no/such/run: no checkpoint'),
])
def test_demo_errors_are_one_line(tmp_path, args, why):
  wd = tmp_path / 'demo'
  p = run_module('jaxspeech.demo', '--workdir', str(wd), *args)
  assert p.returncode == 2, p.stderr[-3000:]
  assert why in one_error_line(p.stderr, 'python -m jaxspeech.demo')
  assert not wd.exists()
