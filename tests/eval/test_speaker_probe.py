"""Speaker probe on synthetic utterances with a known amount of speaker information."""

import numpy as np
import pytest

from jaxspeech.eval.speaker_probe import speaker_probe, split_by_speaker, utterance_means


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
  res = speaker_probe(means[tr], spk[tr], means[te], spk[te], steps=300)
  # The speaker offset (norm ~3.5) dwarfs the noise of a mean of >=5 frames (std <=0.45/dim).
  assert res["accuracy"] == 1.0 and res["chance"] == pytest.approx(1 / 6)
  # Speaker-free features: held-out accuracy near chance (1/6) even though training fits.
  x0, m0, spk0 = _corpus(rng, speaker_scale=0.0)
  means0 = np.asarray(utterance_means(x0, m0))
  res0 = speaker_probe(means0[tr], spk0[tr], means0[te], spk0[te], steps=300)
  assert res0["accuracy"] < 0.45
  assert res0["train_accuracy"] > res0["accuracy"]
  with pytest.raises(ValueError):
    speaker_probe(means[tr], spk[tr], means[te][:1], np.array(["nobody"]))
