"""`python -m benchmarks.run --quick` runs and writes the JSON the scripts rely on.

The fast test runs the encoder (tiny HuBERT only) and data sections; the slow one the whole quick
suite (all four sections, ~3 min on the 2-core CPU). Values are checked for sanity, not against
recorded numbers (they depend on the machine and its load).
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import run


def _check_headline(res: dict) -> None:
  for key in ('encoder_ratio_vs_torch', 'encoder_mfu_cpu', 'matmul_peak_flops', 'machine'):
    assert key in res, key
  assert math.isfinite(res['encoder_ratio_vs_torch']) and res['encoder_ratio_vs_torch'] > 0
  # The step's achieved FLOP/s over the matmul peak measured in the same run.
  assert 0 < res['encoder_mfu_cpu'] < 1.5
  assert res['matmul_peak_flops'] > 1e9
  assert res['machine']['cores'] >= 1 and res['machine']['jax']
  for row in res['encoder']:
    assert row['jax_step_s'] > 0 and row['torch_step_s'] > 0
    assert row['jax_peak_bytes'] > 0 and row['torch_peak_bytes'] > 0
    assert row['ratio_jax_over_torch'] == pytest.approx(row['jax_step_s'] / row['torch_step_s'])


def _check_data(res: dict) -> None:
  runs = res['data']['runs']
  assert {'perturb=None/workers=0', 'perturb=jax/workers=0'} <= set(runs)
  for r in runs.values():
    assert r['audio_s_per_s'] > 0 and r['audio_s'] > 0


@pytest.mark.slow  # default run under 20 min on 2 cores
def test_quick_encoder_and_data(tmp_path):
  out = tmp_path / 'results.json'
  res = run.main(['--quick', '--sections', 'encoder,data', '--models', 'tiny', '--out', str(out)])
  on_disk = json.loads(out.read_text())
  assert on_disk['sections'] == ['encoder', 'data']
  assert on_disk['encoder_ratio_vs_torch'] == res['encoder_ratio_vs_torch']
  assert [r['model'] for r in on_disk['encoder']] == ['tiny']
  _check_headline(on_disk)
  _check_data(on_disk)


def test_unknown_section_is_an_error(tmp_path):
  with pytest.raises(SystemExit):
    run.main(['--quick', '--sections', 'encoder,nope', '--out', str(tmp_path / 'r.json')])


@pytest.mark.slow
def test_quick_suite_all_sections(tmp_path):
  out = tmp_path / 'results.json'
  run.main(['--quick', '--out', str(out)])
  res = json.loads(out.read_text())
  assert set(run.SECTIONS) <= set(res)
  _check_headline(res)
  _check_data(res)
  assert [r['model'] for r in res['encoder']] == ['tiny', 'wavlm-tiny']
  assert set(res['method']) == {'spin', 'dinosr', 'hubert', 'parp'}
  for name, r in res['method'].items():
    assert r['step_s_median'] > 0 and r['ops_s'] > 0, name
    assert 0 < r['share'] < 1, name  # own ops are a part of the step that contains them
    assert r['share'] == pytest.approx(r['ops_s'] / r['step_s_median'])
    assert math.isfinite(r['loss']), name
  rows = res['scaling']['rows']
  assert [r['num_devices'] for r in rows] == [1, 2]
  for r in rows:
    assert r['step_s_median'] > 0 and r['memory_per_device_total_MiB'] > 0
    assert r['batch'][0] == 2 * r['num_devices']  # weak scaling: fixed per-device batch
  assert rows[0]['weak_scaling_efficiency'] == 1.0
