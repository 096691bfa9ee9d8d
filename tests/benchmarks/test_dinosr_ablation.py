"""benchmarks/dinosr_ablation.py without training: the variants (one change each on top of the
pre-issue-15 recipe, eval-only variants reuse the baseline's run), their configs build a DinoSR
method, the edge distances, and the table from hand-made records."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import dinosr_ablation as ab
from jaxspeech.methods import dinosr


def test_variants_change_one_thing_each():
  vs = ab.variants()
  assert vs['baseline'] == ab.BEFORE
  fixes = ab.available_fixes()
  assert {'fairseq_mask', 'ema_skip_pos_conv', 'restart_off', 'eval_windows'} <= set(fixes)
  for v, fix in fixes.items():
    changed = {k for k in vs[v] if vs[v][k] != ab.BEFORE.get(k)}
    assert changed == set(fix), v
  assert all(vs['all'][k] == x for fix in fixes.values() for k, x in fix.items())
  assert ab.run_name('eval_windows', vs['eval_windows'], vs) == 'baseline'
  assert ab.run_name('fairseq_mask', vs['fairseq_mask'], vs) == 'fairseq_mask'
  assert ab.run_name('all', vs['all'], vs) == 'all'


@pytest.mark.parametrize('variant', ['baseline', 'all'])
def test_configs_build_the_method(variant):
  c = ab.make_config(ab.variants()[variant], seed=3, steps=20)
  assert (c.train.num_steps, c.method.ema_anneal_end_step, c.train.seed, c.data.seed) == (
    20, 20, 3, 3)
  m = dinosr.DinosrPretraining(c)
  if variant == 'baseline':  # the README's pre-issue-15 tiny recipe
    assert (m.mask_style, m.ema_skip, m.restart_patience, m.eval_window_samples) == (
      'exact', (), 10, 0)
  else:
    assert (m.mask_style, m.ema_skip, m.restart_patience, m.eval_window_samples) == (
      'fairseq', ('pos_conv',), 0, 16000)


def test_edge_distance():
  np.testing.assert_array_equal(ab.edge_distance(7), [0, 1, 2, 3, 2, 1, 0])
  np.testing.assert_array_equal(ab.edge_distance(50)[18:32], [18, 19] + [20] * 10 + [19, 18])
  np.testing.assert_array_equal(ab.edge_distance(12, window=5),
                                [0, 1, 2, 1, 0, 0, 1, 2, 1, 0, 0, 0])
  # Units that are the capped edge distance itself carry all of it; constant units none.
  units = [ab.edge_distance(n) for n in (30, 45, 60)]
  assert ab.edge_share(units) == pytest.approx(1.0)
  assert ab.edge_share([np.zeros(n, int) for n in (30, 45)]) == pytest.approx(0.0, abs=1e-12)


def test_summary_and_table():
  runs = [{'variant': v, 'seed': s, 'steps': 20, 'codebook_pnmi': 0.2 + 0.1 * i + 0.01 * s,
           'kmeans_pnmi': 0.3, 'codebook_used': 0.5, 'edge_codebook': 0.2, 'edge_kmeans': 0.3,
           'edge_codebook_window': float('nan'), 'speaker_nmi': 0.01, 'acc_masked': 0.2,
           'majority_baseline': 0.1, 'codebook_used_min': 0.4, 'masked_fraction': 0.57,
           'loss': 3.0, 'wall_s': 60.0} for s in (0, 1) for i, v in enumerate(('baseline', 'all'))]
  summary = ab.summarize(runs)
  assert list(summary) == ['baseline', 'all']
  assert summary['all']['codebook_pnmi']['mean'] == pytest.approx(0.305)
  md = ab.table(runs, summary)
  assert '| baseline | 0.205 ± 0.007 | 0.300 ± 0.000 |' in md
  assert '| - |' in md  # no windowed units: no window edge share
