"""Audio file loading shared by the CLIs and the data pipelines.

`load_audio` is the one place where bad input is rejected: unreadable, empty, zero-length or
non-finite audio raises `AudioError` naming the file. Stereo is averaged to mono; other sample
rates are resampled with `scipy.signal.resample_poly` (polyphase FIR with a Kaiser window, the
well-kept resampler already installed with jax). `normalize_waveform` is the per-utterance
zero-mean / unit-variance input normalisation every model is trained with.

`soundfile` is imported when a file is read, so `resample` and `normalize_waveform` work with the
core stack alone (jax, numpy).
"""

from __future__ import annotations

import errno
import math
import os
import stat
from typing import TYPE_CHECKING

import numpy as np

from jaxspeech.errors import UserError

if TYPE_CHECKING:
  import soundfile as sf

SAMPLE_RATE = 16_000


class AudioError(UserError, ValueError):
  """A file that cannot be used as audio; the message names the file and the reason."""


def _soundfile():
  try:
    import soundfile
  except ImportError as e:
    raise ImportError(
      "reading audio files needs the `soundfile` package (pip install soundfile==0.14.0, "
      "or jaxspeech's requirements.txt)"
    ) from e
  return soundfile


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
  """Resamples a 1-D float signal with a polyphase filter. [S] -> [S * target_sr / orig_sr]."""
  if orig_sr == target_sr:
    return wav
  import scipy.signal  # installed with jax; imported here because it is slow to import

  g = math.gcd(int(orig_sr), int(target_sr))
  out = scipy.signal.resample_poly(wav, target_sr // g, orig_sr // g)
  return out.astype(np.float32, copy=False)


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
  """``(wav - mean) / sqrt(var + 1e-7)`` over one utterance's valid samples. [S] -> [S] float32.

  HF ``Wav2Vec2FeatureExtractor(do_normalize=True)`` (its ``zero_mean_unit_var_norm``; 1e-7 is its
  constant) and what the training pipeline feeds every model (``data_pipelines.pipeline``), so
  evaluation and extraction call it too. Pass the unpadded utterance: padding is zero *after*
  normalising, as in both. Computed in the input's dtype (float32 from `load_audio`).
  """
  wav = np.asarray(wav)
  return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)).astype(np.float32, copy=False)


NORMALIZATIONS = ("standard", "peak", "none")


def normalization(normalize: bool | str) -> str:
  """A `normalize` setting -> one of NORMALIZATIONS (True = "standard", False = "none")."""
  if normalize is True or normalize is False:
    return "standard" if normalize else "none"
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize={normalize!r}: choose one of {NORMALIZATIONS}")
  return normalize


def peak_normalize(wav: np.ndarray) -> np.ndarray:
  """Peak at 0.95 (HiFi-GAN's `librosa.util.normalize(audio) * 0.95`). [S] -> [S] float32."""
  wav = np.asarray(wav, np.float32)
  return (0.95 * wav / max(float(np.abs(wav).max(initial=0.0)), 1e-8)).astype(np.float32)


def scale_waveform(wav: np.ndarray, normalize: bool | str) -> np.ndarray:
  """One utterance as the training data path feeds it (`config.data.normalize`): "standard"
  (`normalize_waveform`, the SSL encoders), "peak" (`peak_normalize`, synthesis) or "none"."""
  mode = normalization(normalize)
  if mode == "standard":
    return normalize_waveform(wav)
  if mode == "peak":
    return peak_normalize(wav)
  return np.asarray(wav, np.float32)


def missing_reason(path: str) -> str | None:
  """Why `path` cannot be opened as an audio file, or None if it can: "no such file", "symlink
  loop", "broken symlink to T", "a folder, not a file". One `os.stat`: cheap enough per row."""
  try:
    st = os.stat(path)
  except OSError as e:
    if e.errno == errno.ELOOP:
      return "symlink loop"
    if os.path.islink(path):
      return f"broken symlink to {os.readlink(path)}"
    if e.errno == errno.ENOENT:
      return "no such file"
    return e.strerror or str(e)
  return "a folder, not a file" if stat.S_ISDIR(st.st_mode) else None


def read_info(path: str | os.PathLike) -> sf._SoundFileInfo:
  """Header of an audio file (frames, samplerate, channels) or AudioError naming it."""
  path = os.fspath(path)
  if (why := missing_reason(path)) is not None:
    raise AudioError(f"{path}: {why}")
  sf = _soundfile()
  try:
    return sf.info(path)
  except Exception as e:  # soundfile raises LibsndfileError / RuntimeError on corrupt headers
    raise AudioError(f"{path}: unreadable audio ({e})") from e


def load_audio(path: str | os.PathLike, target_sr: int | None = SAMPLE_RATE, *,
               expect_sr: int | None = None) -> np.ndarray:
  """Reads `path` as float32 mono at `target_sr` (None keeps the file's rate). Returns [S].

  `expect_sr`: the rate the caller believes the file has (a manifest row's `sample_rate`); a
  file at another rate raises instead of being silently resampled from the wrong rate.

  Raises:
    AudioError: the file is missing, unreadable, has no samples, holds NaN/inf, or is not at
      `expect_sr`.
  """
  path = os.fspath(path)
  if (why := missing_reason(path)) is not None:
    raise AudioError(f"{path}: {why}")
  sf = _soundfile()
  try:
    wav, sr = sf.read(path, dtype="float32", always_2d=True)  # [S, C]
  except Exception as e:
    raise AudioError(f"{path}: unreadable audio ({e})") from e
  if expect_sr is not None and sr != expect_sr:
    raise AudioError(f"{path}: the file's sample rate is {sr} Hz, the manifest row says "
                     f"{expect_sr} Hz (the file changed after the manifest was built; rebuild it)")
  if wav.shape[0] == 0:
    raise AudioError(f"{path}: empty audio (0 samples)")
  if not np.all(np.isfinite(wav)):
    raise AudioError(f"{path}: audio contains NaN or inf")
  wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]  # [S]
  if target_sr is not None:
    wav = resample(wav, sr, target_sr)
  return np.ascontiguousarray(wav, dtype=np.float32)
