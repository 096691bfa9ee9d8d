"""HuBERT's MFCC targets against fairseq's recipe as torchaudio computes it.

Reference: fairseq `examples/hubert/simple_kmeans/dump_mfcc_feature.py` = torchaudio 2.11
`compliance.kaldi.mfcc(use_energy=False)` of one utterance's samples in [-1, 1], then
`functional.compute_deltas` twice, concatenated to 39 dims. torchaudio is not installable beside
the project's torch, so its outputs on two real excerpts are committed in
tests/parity/data/torchaudio_mfcc.json together with the script that made them
(scripts/torchaudio_mfcc_reference.py); `compute_deltas` itself is re-run live below from its
definition in torch.

Tolerances: both sides compute in float32; against a float64 evaluation of the same formulas
jaxspeech's 13 MFCCs are off by <= 5.0e-4 and torchaudio's by <= 9.0e-4 (values up to +-80;
the log amplifies FFT rounding in mel bins far below the frame's energy), so the MFCCs agree to
2e-3, deltas to 5e-4, delta-deltas to 3e-4.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeech.methods import hubert

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, '..', '..', '..', 'shared', 'data')
REFERENCE = os.path.join(HERE, 'data', 'torchaudio_mfcc.json')
ATOL = (2e-3, 5e-4, 3e-4)  # MFCCs, deltas, delta-deltas
mfcc_deltas = jax.jit(hubert.mfcc_deltas, static_argnums=2)
targets_features = jax.jit(hubert.mfcc_targets_features, static_argnums=(1, 3))


def assert_features_close(got, want):
  """`[F, 39]` features equal to ATOL per group (MFCCs, deltas, delta-deltas)."""
  assert got.shape == want.shape, (got.shape, want.shape)
  for g, (name, atol) in enumerate(zip(('MFCCs', 'deltas', 'delta-deltas'), ATOL)):
    np.testing.assert_allclose(got[:, 13 * g:13 * (g + 1)], want[:, 13 * g:13 * (g + 1)],
                               rtol=0, atol=atol, err_msg=name)


def _reference():
  import soundfile as sf

  with open(REFERENCE) as f:
    ref = json.load(f)
  clips = []
  for c in ref['clips']:
    path = os.path.join(SHARED, c['path'])
    if not os.path.exists(path):
      pytest.skip(f'{path}: the shared real-audio excerpts are not here')
    x16, _ = sf.read(path, dtype='int16')
    x16 = x16[c['start']:c['start'] + c['num_samples']]
    assert hashlib.sha256(np.ascontiguousarray(x16, '<i2').tobytes()).hexdigest() == \
        c['sha256_int16'], f'{path} changed since the reference was made'
    clips.append((x16.astype(np.float32) / 32768.0,  # soundfile's float read
                  {k: np.array(c[k], np.float32) for k in ('fairseq', 'kaldi')}))
  return clips


def _padded(wavs):
  s = max(len(w) for w in wavs) + 3_000  # padding well past the longest
  batch = np.zeros((len(wavs), s), np.float32)
  for i, w in enumerate(wavs):
    batch[i, :len(w)] = w
  return batch, np.array([len(w) for w in wavs])


@pytest.mark.parametrize('scale', ['fairseq', 'kaldi'])
def test_mfcc_deltas_match_torchaudio(scale):
  """Each utterance alone, and both in one zero-padded batch, equal torchaudio's features."""
  clips = _reference()
  wavs = [w for w, _ in clips]
  batch, lengths = _padded(wavs)
  padded = np.asarray(mfcc_deltas(batch, lengths, scale))
  for (w, ref), got_padded in zip(clips, padded):
    want = ref[scale]  # [F, 39]
    alone = np.asarray(mfcc_deltas(w[None], None, scale))[0]
    assert alone.shape == want.shape == (hubert.num_mfcc_frames(len(w)), 39)
    assert_features_close(alone, want)
    assert_features_close(got_padded[:len(want)], want)


def test_default_scale_is_fairseqs():
  (w, ref), _ = _reference()
  got = np.asarray(jax.jit(hubert.mfcc_deltas)(w[None]))[0]  # default arguments
  assert_features_close(got, ref['fairseq'])
  # The x 32768 scale is another feature: c0 up by sqrt(23) * log(32768^2) = 99.8 where no mel
  # bin is floored, and the floored bins move c1-c12.
  assert np.abs(ref['kaldi'][:, 0] - ref['fairseq'][:, 0] - np.sqrt(23) * np.log(32768.0 ** 2)
                ).min() < 1e-2
  assert np.abs(ref['kaldi'][:, 1:13] - ref['fairseq'][:, 1:13]).max() > 1.0


def _torchaudio_compute_deltas(x, win_length=5):
  """torchaudio.functional.compute_deltas (src/torchaudio/functional/functional.py), in torch:
  replicate-pad (win_length - 1) // 2 frames each side, then a depthwise conv1d with kernel
  [-n, ..., n] divided by n (n + 1) (2n + 1) / 3. `x [C, F]` -> `[C, F]`."""
  import torch

  x = torch.from_numpy(np.asarray(x, np.float32))[None]  # [1, C, F]
  n = (win_length - 1) // 2
  denom = n * (n + 1) * (2 * n + 1) / 3
  x = torch.nn.functional.pad(x, (n, n), mode='replicate')
  kernel = torch.arange(-n, n + 1, 1, dtype=x.dtype).repeat(x.shape[1], 1, 1)
  return (torch.nn.functional.conv1d(x, kernel, groups=x.shape[1]) / denom)[0].numpy()


def test_deltas_per_utterance_match_torch_compute_deltas():
  rng = np.random.default_rng(0)
  lengths = np.array([13, 1, 2, 3, 30, 5])
  x = rng.normal(size=(len(lengths), 30, 4)).astype(np.float32) * 10
  x[np.arange(30)[None, :] >= lengths[:, None]] = 1e4  # padding garbage must never be read
  got = np.asarray(jax.jit(hubert.deltas)(jnp.asarray(x), jnp.asarray(lengths)))
  for i, n in enumerate(lengths):
    want = _torchaudio_compute_deltas(x[i, :n].T).T  # [n, 4]
    np.testing.assert_allclose(got[i, :n], want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[i, n:], 0.0)
  # Without lengths: every frame is valid (replicate padding at the batch's last frame).
  np.testing.assert_allclose(np.asarray(jax.jit(hubert.deltas)(x))[4],
                             _torchaudio_compute_deltas(x[4].T).T, rtol=1e-6, atol=1e-5)


def test_padded_batch_equals_each_utterance_alone():
  """The targets' and the `mfcc` baseline's 50 Hz features of a zero-padded batch of two
  utterances are, frame for frame, those of each utterance computed alone (the deltas of the
  last frames used to read the padding: off by up to several times the dimension's range)."""
  from jaxspeech.eval import common
  from jaxspeech.models.speech_encoder import EncoderConfig

  cfg = EncoderConfig.preset('tiny')
  wavs = [w for w, _ in _reference()]
  batch, lengths = _padded(wavs)
  mask = np.arange(batch.shape[1])[None, :] < lengths[:, None]
  baseline, frame_mask = map(np.asarray, jax.jit(common.mfcc_features)(batch, mask))
  alone = [np.asarray(targets_features(w[None], cfg.num_frames(len(w))))[0]
           for w in wavs]  # [T_i, 39] each
  for i, want in enumerate(alone):
    # The MFCCs of a batch and of one utterance differ by float32 rounding only (other shapes,
    # other XLA kernels): the parity tolerance. Before Dec 2: deltas off by 1.2 and 12.8 here.
    assert frame_mask[i].sum() == len(want)
    assert_features_close(baseline[i, :len(want)], want)
  t = cfg.num_frames(batch.shape[1])
  targets = np.asarray(targets_features(batch, t, lengths))
  for i, want in enumerate(alone):
    assert_features_close(targets[i, :len(want)], want)


def test_kaldi_option_reproduces_the_old_targets():
  """`input_scale='kaldi'` on an unpadded utterance gives the targets of the code before Dec 2
  (x 32768, deltas over the batch): column sums and last frame of its 17 x 39 features of the
  librispeech clip, printed by that code."""
  from jaxspeech.models.speech_encoder import EncoderConfig

  w = _reference()[1][0]
  t = EncoderConfig.preset('tiny').num_frames(len(w))
  got = np.asarray(targets_features(w[None], t, None, 'kaldi'))[0]
  old_sums = [940.9227, -393.4425, -507.0767, 364.4809, 108.8168, 584.9565, -88.37512, 582.0828,
              649.8499, 265.7835, 107.2174, 573.5097, 638.6031, 17.8057, -5.420865, -38.30022,
              2.14719, -21.60518, 2.981076, -6.832538, 15.72461, 19.10677, -13.42811, -12.73209,
              13.49941, 23.68244, -1.488202, -0.7377755, 2.073624, -1.587208, 2.792528, 3.75605,
              -0.5014368, 1.955447, -2.041034, -1.190398, -3.187311, -6.348314, -4.413683]
  old_last = [70.94904, -22.85619, -44.03592, 25.39248, -9.154125, 57.24268, -11.7786, 53.166,
              39.6985, 8.952637, -0.8916092, 20.72433, 42.03856, -0.2009789, -0.6629019, -2.62186,
              -3.087085, -0.7305279, 1.664108, -0.1902603, 3.43218, -0.2095997, -3.271097,
              -2.710202, -2.291836, -2.287114, -0.06909692, -0.03395366, -0.281742, 0.0695399,
              0.3708072, -0.8102776, -0.4030399, -0.02194827, -0.09218048, 0.6723721, 0.3610492,
              -1.093476, 0.1448646]
  assert got.shape == (17, 39)
  np.testing.assert_allclose(got.sum(0), old_sums, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(got[-1], old_last, rtol=1e-5, atol=1e-4)


def test_one_compilation_for_any_lengths():
  traces = []

  @jax.jit
  def f(wav, lengths):
    traces.append(1)
    return hubert.mfcc_targets_features(wav, 24, lengths)

  wav = jnp.zeros((2, 8000))
  for lengths in ([8000, 4000], [500, 7999], [0, 400]):
    assert np.isfinite(np.asarray(f(wav, jnp.asarray(lengths)))).all()
  assert len(traces) == 1
