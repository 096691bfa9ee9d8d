"""The README's `make run` recipe learns: experiments/hubert.py:tiny end to end on the built-in
corpus, masked-prediction accuracy well above the majority-class baseline and 1/K chance.

Slow (~4-5 minutes on 2 CPU cores): `pytest -m slow tests/train/test_hubert_learns.py`.
"""

from __future__ import annotations

import pytest

from tests.train.common import read_metrics, run_python


@pytest.mark.slow
def test_tiny_recipe_masked_accuracy_rises(tmp_path):
  code = ('from absl import app\nfrom jaxspeech import main\nimport sys\n'
          f'sys.argv = ["main", "--config", "experiments/hubert.py:tiny", "--workdir", '
          f'{str(tmp_path)!r}]\napp.run(main.main)\n')
  proc = run_python(code, devices=1, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = read_metrics(str(tmp_path))
  first, last = rows[0], rows[-1]
  assert last['step'] == 1000
  k = 50
  print(f"acc_masked {first['acc_masked']:.3f} -> {last['acc_masked']:.3f}; majority "
        f"{last['majority_baseline']:.3f}; chance {1 / k:.3f}")
  assert last['loss'] < first['loss']
  assert last['acc_masked'] > 2.0 * last['majority_baseline']
  assert last['acc_masked'] > 5.0 / k
