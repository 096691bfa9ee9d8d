"""Manifests: one JSON object a line (JSON Lines), one line per utterance.

Fields (see data_pipelines/README.md):
  path         audio file; absolute, or relative to the folder holding the manifest file.
  n_samples    samples at the file's own rate (after mixing to mono).
  sample_rate  the file's rate in Hz.
  speaker      speaker label (string).
  text         optional transcript.
  phones       optional phone sequence (space-separated string).
  alignment    optional list of [phone, start_s, end_s] (seconds from the file's start).
  split        optional split name ("train", "test", ...).
Other keys (e.g. `id`, `digit`) are kept as they are.

CLI:
  python -m data_pipelines.manifest --root DIR --layout {librispeech,fsdd,folder,speechbrain} \
    --out FILE [--skip-bad]

Every file is decoded while building (not only its header), so corrupt, empty, NaN/inf and
missing files are found now: they stop the build with one error naming every bad file, or with
`--skip-bad` are left out and listed on stderr. Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import sys
from collections.abc import Iterable

from jaxspeech.audio import AudioError, load_audio, read_info
from jaxspeech.errors import UserError

LAYOUTS = ("librispeech", "fsdd", "folder", "speechbrain")
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
REQUIRED = ("path", "n_samples", "sample_rate", "speaker")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ManifestError(UserError, ValueError):
  """Bad audio files or malformed manifest rows; the message names each file / line."""


# ---------------------------------------------------------------------------------------------
# Reading and writing.


def read_manifest(path: str | os.PathLike, required: Iterable[str] = REQUIRED) -> list[dict]:
  """Reads a JSONL manifest; relative `path`s become absolute (relative to the manifest's folder).

  `required`: fields every row must have (default: an audio row's; `()` for rows of another
  modality: text, images, labels). Raises ManifestError naming the manifest and line for
  malformed rows or missing fields.
  """
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  rows = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{lineno}: not JSON ({e})") from e
      if not isinstance(row, dict):
        raise ManifestError(f"{path}:{lineno}: not a JSON object")
      missing = [k for k in required if k not in row]
      if missing:
        raise ManifestError(f"{path}:{lineno}: missing field(s) {missing}")
      if "path" in row:
        row["path"] = os.path.normpath(os.path.join(base, row["path"]))
      rows.append(row)
  return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[dict], *, relative: bool = False):
  """Writes rows as JSON Lines. With `relative`, paths are stored relative to the file's folder."""
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  os.makedirs(base, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in rows:
      row = dict(row)
      if "path" in row:  # rows of other modalities (images, text) have no file
        p = os.path.abspath(row["path"])
        row["path"] = os.path.relpath(p, base) if relative else p
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)  # atomic: a reader never sees half a manifest


# ---------------------------------------------------------------------------------------------
# Layouts: each yields partial rows (path, speaker, optional labels); `build_manifest` adds
# n_samples / sample_rate by decoding the file.


def _audio_files(root: str, exts=AUDIO_EXTS) -> list[str]:
  out = []
  for dirpath, _, files in os.walk(root):
    out += [os.path.join(dirpath, f) for f in files if f.lower().endswith(exts)]
  return sorted(out)


def _librispeech(root: str) -> list[dict]:
  """`<spk>-<chapter>-<utt>.flac`, transcripts from `<spk>-<chapter>.trans.txt` when present."""
  texts = {}
  for tf in glob.glob(os.path.join(root, "**", "*.trans.txt"), recursive=True):
    with open(tf) as f:
      for line in f:
        utt, _, text = line.strip().partition(" ")
        if utt:
          texts[utt] = text
  rows = []
  for p in _audio_files(root, (".flac", ".wav")):
    utt = os.path.splitext(os.path.basename(p))[0]
    m = re.fullmatch(r"(\d+)-(\d+)-(\d+)", utt)
    if not m:
      raise ManifestError(f"{p}: not a LibriSpeech name <speaker>-<chapter>-<utterance>")
    row = {"path": p, "id": utt, "speaker": m.group(1)}
    if utt in texts:
      row["text"] = texts[utt]
    # LibriSpeech subsets are folders named like the split (train-clean-100, dev-other, ...).
    split = next((c for c in p.split(os.sep) if re.fullmatch(r"(train|dev|test)-\w+", c)), None)
    if split:
      row["split"] = split
    rows.append(row)
  return rows


def _fsdd(root: str) -> list[dict]:
  """`{digit}_{speaker}_{index}.wav`; FSDD's own split: index 0-4 test, 5-49 train."""
  rows = []
  for p in _audio_files(root, (".wav",)):
    name = os.path.splitext(os.path.basename(p))[0]
    m = re.fullmatch(r"(\d)_([A-Za-z]+)_(\d+)", name)
    if not m:
      raise ManifestError(f"{p}: not an FSDD name <digit>_<speaker>_<index>.wav")
    digit, spk, idx = int(m.group(1)), m.group(2), int(m.group(3))
    rows.append({
      "path": p, "id": name, "speaker": spk, "text": DIGITS[digit], "digit": digit,
      "split": "test" if idx < 5 else "train",
    })  # fmt: skip
  return rows


def _folder(root: str) -> list[dict]:
  """Any audio under root; speaker = first folder below root (else "unknown"); text from a
  sidecar `<stem>.txt` when present."""
  rows = []
  for p in _audio_files(root):
    rel = os.path.relpath(p, root).split(os.sep)
    row = {"path": p, "id": os.path.splitext("/".join(rel))[0]}
    row["speaker"] = rel[0] if len(rel) > 1 else "unknown"
    txt = os.path.splitext(p)[0] + ".txt"
    if os.path.exists(txt):
      with open(txt) as f:
        row["text"] = f.read().strip()
    rows.append(row)
  return rows


def _speechbrain(root: str) -> list[dict]:
  """SpeechBrain ASR json (`ASR_*.json`): `wav` with `{data_root}`, `spk_id`, `wrd`, `phn` and
  `ground_truth_phn_ends` (phone end times in samples at 16 kHz) -> alignment in seconds.
  Audio in root that no json lists gets a row without labels (speaker from `spkN_` prefix)."""
  rows, listed = [], set()
  jsons = sorted(glob.glob(os.path.join(root, "ASR_*.json")))
  if not jsons:
    raise ManifestError(f"{root}: no ASR_*.json files (speechbrain layout)")
  for jf in jsons:
    split = os.path.splitext(os.path.basename(jf))[0].removeprefix("ASR_")
    with open(jf) as f:
      data = json.load(f)
    for utt, e in data.items():
      p = os.path.normpath(e["wav"].replace("{data_root}", root))
      row = {"path": p, "id": utt, "speaker": e.get("spk_id", utt.split("_")[0]), "split": split}
      if "wrd" in e:
        row["text"] = e["wrd"]
      if "phn" in e:
        row["phones"] = e["phn"]
      if "phn" in e and "ground_truth_phn_ends" in e:
        phn = e["phn"].split()
        ends = [int(x) for x in str(e["ground_truth_phn_ends"]).split()]
        if len(phn) != len(ends):
          raise ManifestError(f"{jf}: {utt}: {len(phn)} phones but {len(ends)} end times")
        sr = 16_000  # speechbrain's end times are in samples of the 16 kHz files
        starts = [0] + ends[:-1]
        row["alignment"] = [[ph, s / sr, t / sr] for ph, s, t in zip(phn, starts, ends)]
      rows.append(row)
      listed.add(p)
  for p in _audio_files(root):
    if p not in listed:
      stem = os.path.splitext(os.path.basename(p))[0]
      rows.append({"path": p, "id": stem, "speaker": stem.split("_")[0]})
  return rows


_LAYOUT_FNS = {
  "librispeech": _librispeech, "fsdd": _fsdd, "folder": _folder, "speechbrain": _speechbrain,
}  # fmt: skip


def _probe(path: str) -> tuple[int, int]:
  """(n_samples, sample_rate) after a full decode; AudioError names the file if it is bad."""
  info = read_info(path)
  # Decode everything (not only the header): a truncated or NaN file must fail here, not at
  # step 10k of training.
  n = load_audio(path, target_sr=None).shape[0]
  if n != info.frames:
    raise AudioError(f"{path}: corrupt or truncated (header says {info.frames} samples, {n} read)")
  return n, info.samplerate


def build_manifest(
  root: str | os.PathLike, layout: str, *, skip_bad: bool = False, num_threads: int = 4
) -> tuple[list[dict], list[str]]:
  """Rows for every audio file of `root` in `layout`, and the bad files' error messages.

  Raises ManifestError naming every bad file unless `skip_bad` (then they are returned instead).
  """
  root = os.path.abspath(os.fspath(root))
  if layout not in _LAYOUT_FNS:
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
  if not os.path.isdir(root):
    raise ManifestError(f"{root}: no such folder")
  partial = _LAYOUT_FNS[layout](root)
  if not partial:
    raise ManifestError(f"{root}: no audio files found for layout {layout!r}")

  def probe(row):
    try:
      return _probe(row["path"]), None
    except AudioError as e:
      return None, str(e)

  # libsndfile releases the GIL while decoding, so threads overlap file reads and decodes.
  with concurrent.futures.ThreadPoolExecutor(num_threads) as ex:
    results = list(ex.map(probe, partial))
  rows, bad = [], []
  for row, (info, err) in zip(partial, results):
    if err is not None:
      bad.append(err)
      continue
    row["n_samples"], row["sample_rate"] = info
    rows.append({k: row[k] for k in REQUIRED} | {k: v for k, v in row.items() if k not in REQUIRED})
  if bad and not skip_bad:
    raise ManifestError(
      f"{len(bad)} bad audio file(s) under {root} (use --skip-bad to skip them):\n  "
      + "\n  ".join(bad)
    )
  return rows, bad


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--root", required=True, help="folder holding the corpus")
  ap.add_argument("--layout", required=True, choices=LAYOUTS)
  ap.add_argument("--out", required=True, help="manifest file to write (.jsonl)")
  ap.add_argument("--skip-bad", action="store_true", help="skip bad files and list them")
  ap.add_argument(
    "--relative", action="store_true", help="store paths relative to the manifest's folder"
  )
  args = ap.parse_args(argv)
  try:
    rows, bad = build_manifest(args.root, args.layout, skip_bad=args.skip_bad)
  except ManifestError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  write_manifest(args.out, rows, relative=args.relative)
  speakers = {r["speaker"] for r in rows}
  print(f"wrote {args.out}: {len(rows)} rows, {len(speakers)} speakers")
  if bad:
    print(f"skipped {len(bad)} bad file(s):\n  " + "\n  ".join(bad), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
