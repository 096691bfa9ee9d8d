"""Spin's speaker perturbation on the CPU: Praat "Change gender" + random 10-band EQ.

Runs in the Grain workers (one utterance at a time, numpy in / numpy out), so with N workers N
utterances are perturbed in parallel. Random ranges are Spin's (`../shared/SEEDS.md` §1), shared
with the JAX version in `jaxspeech.ops.perturb` (which also owns the EQ biquad design).
Durations are kept: the output has exactly the input's length.
"""

from __future__ import annotations

import numpy as np
import scipy.signal

from jaxspeech.ops import perturb as jax_perturb

PITCH_FLOOR_HZ, PITCH_CEILING_HZ = 75.0, 600.0  # Praat's standard pitch-analysis range


def _ratio(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
  r = rng.uniform(*lo_hi)
  return 1.0 / r if rng.random() < 0.5 else r


def sample_params(rng: np.random.Generator) -> dict:
  """One utterance's random perturbation parameters (Spin's ranges)."""
  e = jax_perturb.EQ_BANDS
  return {
    "formant_ratio": _ratio(rng, jax_perturb.FORMANT_RANGE),
    "pitch_ratio": _ratio(rng, jax_perturb.PITCH_RANGE),
    "pitch_range_ratio": _ratio(rng, jax_perturb.PITCH_RANGE_RANGE),
    "eq_gain_db": rng.uniform(-jax_perturb.EQ_GAIN_DB, jax_perturb.EQ_GAIN_DB, e),
    "eq_q": jax_perturb.EQ_Q_MIN
    * (jax_perturb.EQ_Q_MAX / jax_perturb.EQ_Q_MIN) ** rng.uniform(0, 1, e),
  }


def change_gender(
  wav: np.ndarray, sample_rate: int, formant_ratio: float, pitch_ratio: float,
  pitch_range_ratio: float,
) -> np.ndarray:  # fmt: skip
  """Praat "Change gender" with the new pitch median = measured median x `pitch_ratio`. [S]->[S].

  Unvoiced input (no pitch found) keeps its pitch (Praat's new median 0 = unchanged)."""
  import parselmouth  # optional dependency (extra "perturb"); imported where it is needed

  snd = parselmouth.Sound(wav.astype(np.float64), sampling_frequency=sample_rate)
  pitch = snd.to_pitch_ac(
    time_step=0.8 / PITCH_FLOOR_HZ, pitch_floor=PITCH_FLOOR_HZ, pitch_ceiling=PITCH_CEILING_HZ
  )
  f0 = pitch.selected_array["frequency"]
  voiced = f0[f0 > 0]
  new_median = float(np.median(voiced)) * pitch_ratio if voiced.size else 0.0
  out = parselmouth.praat.call(
    [snd, pitch], "Change gender", formant_ratio, new_median, pitch_range_ratio, 1.0
  ).values[0]  # [S']
  # Praat keeps the duration; guard the sample count anyway so frames stay aligned 1:1.
  out = out[: wav.shape[0]] if out.shape[0] >= wav.shape[0] else np.pad(
    out, (0, wav.shape[0] - out.shape[0]))  # fmt: skip
  return out.astype(np.float32)


def random_eq(wav: np.ndarray, sample_rate: int, gain_db, q) -> np.ndarray:
  """The 10-band parametric EQ as a cascade of IIR biquads (as Spin filters). [S] -> [S]."""
  sos = jax_perturb.eq_biquads(np.asarray(gain_db), np.asarray(q), sample_rate, xp=np)  # [E, 6]
  return scipy.signal.sosfilt(sos, wav).astype(np.float32)


def praat_perturb(wav: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
  """Spin's perturbation of one utterance: Change gender, then EQ, clipped to [-1, 1]. [S]->[S]."""
  p = sample_params(rng)
  y = change_gender(wav, sample_rate, p["formant_ratio"], p["pitch_ratio"],
                    p["pitch_range_ratio"])  # fmt: skip
  y = random_eq(y, sample_rate, p["eq_gain_db"], p["eq_q"])
  return np.clip(y, -1.0, 1.0)
