"""Phone inventories and frame-level phone labels from alignments.

An alignment is a list of `[phone, start_s, end_s]` (seconds, ascending, contiguous or not).
`frame_labels` turns it into one phone id per frame at a frame rate (50 Hz = the encoder's 20 ms
frames; 100 Hz = 10 ms frames): frame i gets the phone whose segment covers the frame's centre
`(i + 0.5) / frame_rate`; frames no segment covers get `ignore_id` (-1 by default).

The synthetic corpus (espeak-ng + MBROLA) uses MBROLA's SAMPA phones. The American voices
(us1/us2/us3) share one set; the British en1 voice has its own vowels, which `canonical_phone`
maps onto the American set so that one phone id means one sound class across all speakers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

SILENCE = "_"

# The MBROLA us1/us2/us3 SAMPA set (from `mbrola -i`), silence first so it gets id 0.
# Aspirated allophones (p_h, t_h, k_h) and "Or" / "l=" are voice-specific variants: folded below.
US_PHONES = (
  SILENCE,
  "p", "t", "4", "k", "b", "d", "g",
  "f", "s", "S", "tS", "T", "v", "z", "Z", "dZ", "D", "h",
  "m", "n", "N", "l", "r", "j", "w", "r=",
  "i", "A", "O", "u", "I", "E", "{", "V", "U", "@",
  "EI", "AI", "OI", "@U", "aU",
)  # fmt: skip

# en1 (British) vowels and voice-specific allophones -> the American set above. Nearest US
# vowel by IPA value; the centring diphthongs keep their first element (their schwa is brief).
_TO_US = {
  "i:": "i", "A:": "A", "O:": "O", "u:": "u", "3:": "r=", "e": "E", "Q": "A",
  "eI": "EI", "aI": "AI", "I@": "I", "e@": "E", "U@": "U",
  "5": "l", "O2": "O",  # en1's dark / syllabic l and its "all" vowel
  "p_h": "p", "t_h": "t", "k_h": "k", "Or": "O", "l=": "l",
}  # fmt: skip


def canonical_phone(phone: str) -> str:
  """Maps a voice-specific MBROLA phone onto `US_PHONES` (identity for US phones)."""
  return _TO_US.get(phone, phone)


def write_inventory(path: str | os.PathLike, phones: Sequence[str]) -> None:
  """Writes one phone a line; the line number (from 0) is the phone id."""
  with open(path, "w") as f:
    f.write("".join(p + "\n" for p in phones))


def read_inventory(path: str | os.PathLike) -> list[str]:
  """Reads a phone inventory written by `write_inventory`."""
  with open(path) as f:
    phones = [line.rstrip("\n") for line in f if line.strip()]
  if len(set(phones)) != len(phones):
    raise ValueError(f"{os.fspath(path)}: phone inventory has duplicate entries")
  return phones


def inventory_from_alignments(alignments: Iterable[Sequence]) -> list[str]:
  """The sorted set of phones used in `alignments`, silence (if present) first."""
  seen = {seg[0] for ali in alignments for seg in ali}
  rest = sorted(seen - {SILENCE})
  return ([SILENCE] if SILENCE in seen else []) + rest


def num_frames(n_samples: int, sample_rate: int, frame_rate: float) -> int:
  """Number of whole frames of `1 / frame_rate` seconds in `n_samples` samples."""
  return int(n_samples * frame_rate // sample_rate)


def frame_labels(
  alignment: Sequence[Sequence],
  n_frames: int,
  frame_rate: float,
  phone_to_id: dict[str, int],
  *,
  offset_s: float = 0.0,
  ignore_id: int = -1,
) -> np.ndarray:
  """Per-frame phone ids. Returns int32 [n_frames].

  Args:
    alignment: `[phone, start_s, end_s]` rows, sorted by start.
    n_frames: how many frames to label (e.g. `num_frames(...)`, or the encoder's frame count).
    frame_rate: frames per second (50 for 20 ms frames, 100 for 10 ms).
    phone_to_id: phone -> id; a phone not in it raises KeyError naming the phone.
    offset_s: time of frame 0's start in the alignment's clock (a crop's start, in seconds).
    ignore_id: id of frames no segment covers (padding beyond the alignment).
  """
  centres = offset_s + (np.arange(n_frames) + 0.5) / frame_rate  # [F]
  if not alignment:
    return np.full((n_frames,), ignore_id, np.int32)
  starts = np.asarray([float(s[1]) for s in alignment])  # [P]
  ends = np.asarray([float(s[2]) for s in alignment])  # [P]
  try:
    ids = np.asarray([phone_to_id[s[0]] for s in alignment], np.int32)  # [P]
  except KeyError as e:
    raise KeyError(f"phone {e.args[0]!r} is not in the phone inventory") from None
  # Segment whose start is the last one <= the centre (searchsorted: vectorised, O(F log P)).
  seg = np.searchsorted(starts, centres, side="right") - 1  # [F]
  segc = np.clip(seg, 0, len(ids) - 1)
  covered = (seg >= 0) & (centres < ends[segc])
  return np.where(covered, ids[segc], ignore_id).astype(np.int32)
