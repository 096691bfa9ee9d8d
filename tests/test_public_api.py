"""The public API (`jaxspeech.ops`, `.layers`, `.models`, `.interop`) is usable from another JAX
project: it imports and runs with the core stack only, its API docs build, and (slow) it installs
into a fresh venv holding only jax, flax, numpy and einops and runs the example there."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC = ('jaxspeech.ops', 'jaxspeech.layers', 'jaxspeech.models', 'jaxspeech.interop')
# The training stack and the interop extras: none may be needed to import or run the public API.
BLOCKED = ('grain', 'orbax', 'torch', 'transformers', 'tensorflow', 'tensorflow_datasets', 'clu',
           'soundfile', 'parselmouth')

# Prepended to every child script: a meta-path finder that makes importing a blocked package fail
# (installed or not), so an `import grain` at the top of any public module fails the test.
BLOCKER = textwrap.dedent(f"""\
  import importlib.abc, sys
  BLOCKED = {BLOCKED!r}
  class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name.split('.')[0] in BLOCKED:
        raise ImportError(f'{{name}} is blocked: the public API must import without it')
      return None
  early = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
  assert not early, f'imported before the blocker was installed: {{early}}'
  sys.meta_path.insert(0, _Block())
  """)

CHECK = textwrap.dedent(f"""\
  import importlib, json, pkgutil
  public = {{}}
  for pkg_name in {PUBLIC!r}:
    pkg = importlib.import_module(pkg_name)
    assert (pkg.__doc__ or '').strip(), f'{{pkg_name}} has no docstring'
    assert list(pkg.__all__) == sorted(set(pkg.__all__)), f'{{pkg_name}}.__all__ unsorted'
    public[pkg_name] = [n for n in pkg.__all__ if getattr(pkg, n) is not None]
    for mod in pkgutil.walk_packages(pkg.__path__, pkg_name + '.'):  # every module, exported or not
      importlib.import_module(mod.name)

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jaxspeech.models import EncoderConfig, SpeechEncoder
  from jaxspeech.ops import sinkhorn

  logits = jax.random.normal(jax.random.key(0), (2, 6, 4))  # [B, T, K]
  mask = jnp.arange(6)[None, :] < jnp.array([[6], [3]])  # [B, T]
  q = np.asarray(sinkhorn.sinkhorn(logits, mask))
  cfg = EncoderConfig.preset('tiny', num_hidden_layers=1)
  out = SpeechEncoder(cfg, rngs=nnx.Rngs(0))(jnp.ones((2, 1600)), jnp.ones((2, 1600), bool))
  print(json.dumps({{
    'public': public,
    'row_sums': q.sum(-1).tolist(),
    'shape': list(out.last_hidden_state.shape),
    'frames': cfg.num_frames(1600),
    'finite': bool(np.isfinite(np.asarray(out.last_hidden_state)).all()),
  }}))
  """)


def _run_blocked(code: str, env_extra: dict | None = None, timeout: int = 300):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **(env_extra or {}))
  return subprocess.run([sys.executable, '-c', BLOCKER + code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_public_api_imports_and_runs_without_the_training_stack():
  r = _run_blocked(CHECK)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(res['public']) == set(PUBLIC)
  assert 'sinkhorn' in res['public']['jaxspeech.ops']
  assert 'SpeechEncoder' in res['public']['jaxspeech.models']
  assert 'load_encoder' in res['public']['jaxspeech.interop']
  # Sinkhorn targets: each valid frame is a distribution, padded frames are 0.
  assert res['row_sums'][0] == pytest.approx([1.0] * 6, abs=1e-5)
  assert res['row_sums'][1] == pytest.approx([1.0] * 3 + [0.0] * 3, abs=1e-5)
  assert res['shape'] == [2, res['frames'], 128] and res['finite']


def test_the_blocker_catches_a_top_level_heavy_import(tmp_path):
  """The check above can fail: a module importing grain at its top is refused."""
  pkg = tmp_path / 'leaky_ops'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('import grain  # what a public module must never do\n')
  r = _run_blocked('import leaky_ops\n', {'PYTHONPATH': str(tmp_path)})
  assert r.returncode != 0
  assert 'grain is blocked' in r.stderr


def test_api_docs_build(tmp_path):
  pytest.importorskip('pdoc')
  out = tmp_path / 'api'
  r = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'make_api_docs.sh'), str(out)],
                     cwd=REPO, env=dict(os.environ, PY=sys.executable), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'warn' not in r.stderr.lower(), r.stderr[-3000:]
  for pkg in PUBLIC:
    page = out / (pkg.replace('.', '/') + '.html')
    assert page.is_file(), page
  html = (out / 'jaxspeech' / 'ops' / 'sinkhorn.html').read_text()
  assert 'sinkhorn_log' in html and 'Sinkhorn-Knopp' in html


# Exactly the core stack: jax, flax (which brings optax, orbax-checkpoint, ...), numpy, einops.
CORE_PINS = ('jax==0.10.2', 'jaxlib==0.10.2', 'flax==0.12.8', 'numpy==2.4.6', 'einops==0.8.2')


@pytest.mark.slow
def test_fresh_venv_with_core_deps_runs_the_example(tmp_path):
  t0 = time.perf_counter()
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  py = str(venv / 'bin' / 'python')
  pip = [py, '-m', 'pip', 'install', '-q', '--disable-pip-version-check']
  # requirements.txt only constrains the versions of flax's own dependencies (optax...).
  subprocess.run(pip + ['-c', os.path.join(REPO, 'requirements.txt'), *CORE_PINS], check=True)
  # A copy of the project, so the build leaves nothing in the working tree.
  src = tmp_path / 'src'
  ignore = shutil.ignore_patterns('__pycache__', '*.egg-info')
  for d in ('jaxspeech', 'data_pipelines', 'experiments', 'benchmarks'):
    shutil.copytree(os.path.join(REPO, d), src / d, ignore=ignore)
  for f in ('setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, f), src / f)
  subprocess.run(pip + ['--no-deps', str(src)], check=True)
  t_install = time.perf_counter() - t0

  installed = subprocess.run([py, '-m', 'pip', 'list', '--format=json'], check=True,
                             capture_output=True, text=True).stdout
  names = {p['name'].lower().replace('_', '-') for p in json.loads(installed)}
  for heavy in ('grain', 'torch', 'transformers', 'tensorflow', 'tensorflow-datasets', 'clu',
                'soundfile', 'praat-parselmouth', 'ml-collections', 'chex', 'safetensors'):
    assert heavy not in names, f'{heavy} is installed in the core-only venv'

  run_dir = tmp_path / 'run'  # not the repository: jaxspeech must come from the venv
  run_dir.mkdir()
  example = shutil.copy(os.path.join(REPO, 'examples', 'spin_loss_in_your_loop.py'), run_dir)
  t1 = time.perf_counter()
  r = subprocess.run([py, example, '--steps', '3'], cwd=run_dir, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  losses = [float(x) for x in re.findall(r'^step \d+ loss (\S+)$', r.stdout, re.M)]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses), r.stdout
  t_run = time.perf_counter() - t1
  print(f'fresh venv: install {t_install:.0f} s, example --steps 3 {t_run:.0f} s, '
        f'total {time.perf_counter() - t0:.0f} s')
