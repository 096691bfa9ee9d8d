"""Speaker probe on synthetic utterances with a known amount of speaker information."""

import numpy as np
import pytest

from jaxspeech.eval.speaker_probe import (
  CS,
  cv_folds,
  probe_features,
  speaker_probe,
  split_by_speaker,
  utterance_means,
)


def _corpus(rng, speaker_scale, n_spk=6, n_utt=10, t=20, d=12):
  spk_vec = rng.normal(size=(n_spk, d))
  feats, masks, spks = [], [], []
  for s in range(n_spk):
    for _ in range(n_utt):
      length = rng.integers(5, t + 1)
      x = speaker_scale * spk_vec[s] + rng.normal(size=(t, d))  # content noise per frame
      x[length:] = 1e3  # padding garbage must not matter
      feats.append(x)
      masks.append(np.arange(t) < length)
      spks.append(f"spk{s}")
  return np.stack(feats).astype(np.float32), np.stack(masks), np.array(spks)


def test_utterance_means_ignore_padding():
  rng = np.random.default_rng(0)
  x, m, _ = _corpus(rng, 1.0, n_spk=2, n_utt=2)
  got = np.asarray(utterance_means(x, m))
  want = np.stack([x[i][m[i]].mean(0) for i in range(len(x))])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_split_by_speaker():
  spk = np.array(["a"] * 5 + ["b"] * 2 + ["c"])
  tr, te = split_by_speaker(spk, 0.3, seed=0)
  assert sorted(tr.tolist() + te.tolist()) == list(range(8))
  assert set(spk[te]) == {"a", "b"} and set(spk[tr]) == {"a", "b", "c"}
  assert (spk[te] == "a").sum() == 2 and (spk[te] == "b").sum() == 1


def test_probe_finds_speakers_and_fails_without_them():
  rng = np.random.default_rng(1)
  x, m, spk = _corpus(rng, speaker_scale=1.0)
  means = np.asarray(utterance_means(x, m))
  tr, te = split_by_speaker(spk, 0.3, seed=1)
  res = speaker_probe(means[tr], spk[tr], means[te], spk[te])
  # The speaker offset (norm ~3.5) dwarfs the noise of a mean of >=5 frames (std <=0.45/dim).
  assert res["accuracy"] == 1.0 and res["chance"] == pytest.approx(1 / 6)
  assert res["C"] in CS and res["cv_accuracy"] == 1.0
  # Speaker-free features: held-out accuracy near chance (1/6); cross-validation finds nothing
  # to fit, so it picks a strong regularisation instead of memorising the training set.
  x0, m0, spk0 = _corpus(rng, speaker_scale=0.0)
  means0 = np.asarray(utterance_means(x0, m0))
  res0 = speaker_probe(means0[tr], spk0[tr], means0[te], spk0[te])
  assert res0["accuracy"] < 0.45 and res0["cv_accuracy"] < 0.45
  assert res0["majority_baseline"] == pytest.approx(1 / 6)  # 3 held out per speaker
  with pytest.raises(ValueError):
    speaker_probe(means[tr], spk[tr], means[te][:1], np.array(["nobody"]))
  with pytest.raises(ValueError, match="2 training speakers"):
    speaker_probe(means[:3], ["a"] * 3, means[:1], ["a"])


def test_cv_folds_stratified_and_grouped():
  y = np.repeat([0, 1, 2], [12, 9, 3])
  folds = cv_folds(y, seed=0)
  assert len(folds) == 3  # the rarest class has 3 rows
  for a, b in folds:
    assert set(y[b]) == {0, 1, 2} and len(set(a) | set(b)) == len(y) and not set(a) & set(b)
  groups = np.repeat(np.arange(8), 3)  # 8 utterances of 3 frames; classes 0, 0, 1, 1, ...
  yg = np.repeat([0, 0, 1, 1, 0, 1, 0, 1], 3)
  folds = cv_folds(yg, groups, folds=5, seed=0)
  assert len(folds) == 4  # each class has 4 utterances
  for a, b in folds:
    assert not set(groups[a]) & set(groups[b])


def test_probe_features_both_levels():
  """The task's dict: the utterance probe under the old keys, the frame probe beside it."""
  rng = np.random.default_rng(2)
  x, m, spk = _corpus(rng, speaker_scale=0.5, n_spk=4, n_utt=8)
  feats = [x[i][m[i]] for i in range(len(x))]
  r = probe_features(feats, spk, seed=0, frames_per_utt=4)
  assert r["accuracy"] == 1.0 and r["chance"] == 0.25 and r["num_speakers"] == 4
  assert r["num_train"] + r["num_test"] == 32 and r["num_test"] == 8
  # Single frames carry the speaker offset (norm ~1.7) in noise of std 1 per dimension.
  assert 0.5 < r["frame_accuracy"] <= 1.0 and r["frame_C"] in CS
  assert all(isinstance(v, float) for v in r.values())
  from jaxspeech.eval.registry import EvalError

  with pytest.raises(EvalError):
    probe_features(feats[:8], spk[:8])  # one speaker
