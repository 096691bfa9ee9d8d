"""The import layering contracts in `.importlinter` hold (`lint-imports`, import-linter).

They keep the public library (ops, layers, models, interop) free of the training system and of
the heavy packages, keep experiment configs and benchmarks out of the library, keep the CLIs at
the top, and forbid import cycles between jaxspeech's subpackages and modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
  pytest.importorskip('importlinter')
  exe = os.path.join(os.path.dirname(sys.executable), 'lint-imports')
  exe = exe if os.path.exists(exe) else shutil.which('lint-imports')
  assert exe, 'lint-imports not found (pip install -r requirements-dev.txt)'
  r = subprocess.run([exe, '--config', os.path.join(REPO, '.importlinter'), '--no-cache'],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
  assert 'BROKEN' not in r.stdout and ' 0 broken' in r.stdout
