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

Every file is decoded while building (not only its header), so corrupt, empty, truncated, NaN/inf
and missing files are found now: they stop the build with one error line naming the first few bad
files and their count, or with `--skip-bad` are left out and listed on stderr. Nothing is dropped
silently. Errors (bad files, an `--out` that is a folder or unwritable) are one line, exit 2.

Before training, `verify_files(rows)` checks that every row's file is still there and still what
the row says (rate, length, not truncated), in parallel and cached by (path, size, mtime).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import errno
import glob
import json
import os
import re
import struct
import sys
from collections.abc import Iterable, Sequence

from jaxspeech.audio import AudioError, load_audio, missing_reason, read_info
from jaxspeech.errors import UserError, run_cli

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
  modality: text, images, labels). Raises ManifestError naming the manifest (and line) for
  malformed rows, missing fields or a manifest without rows; FileNotFoundError /
  IsADirectoryError naming it when it is not a file.
  """
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(errno.ENOENT, "no such manifest file", path)
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, "a folder, not a manifest file", path)
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
  if not rows:
    raise ManifestError(f"{path}: empty manifest (no rows)")
  return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[dict], *, relative: bool = False):
  """Writes rows as JSON Lines. With `relative`, paths are stored relative to the file's folder.

  Atomic: written to a temporary file beside `path`, renamed over it at the end, and removed if
  anything fails (no half manifest, no stray temporary). A `path` that is a folder raises
  IsADirectoryError; unwritable places raise the OSError naming the path.
  """
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, "a folder, not a manifest file", path)
  os.makedirs(base, exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      for row in rows:
        row = dict(row)
        if "path" in row:  # rows of other modalities (images, text) have no file
          p = os.path.abspath(row["path"])
          row["path"] = os.path.relpath(p, base) if relative else p
        f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a manifest
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


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
  sidecar `<stem>.txt` when present. id = the path below root without its extension (`spk/x`),
  or with it (`spk/x.mp3`, `spk/x.ogg`) when several audio files share that stem."""
  files = _audio_files(root)
  stems = [os.path.splitext(os.path.relpath(p, root))[0] for p in files]
  shared = {s for s, n in collections.Counter(stems).items() if n > 1}
  rows = []
  for p, stem in zip(files, stems):
    rel = os.path.relpath(p, root).split(os.sep)
    row = {"path": p, "id": "/".join(rel) if stem in shared else stem.replace(os.sep, "/")}
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


# ---------------------------------------------------------------------------------------------
# Checking the files of a manifest before training (`verify_files`).

_W64_RIFF = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"  # Sony Wave64 GUIDs
_W64_DATA = b"data\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streamed WAVs: the writer never went back to fill the size in


def _data_chunk(path: str) -> tuple[int, int] | None:
  """(declared, present) bytes of the sample data of a RIFF / RF64 / Wave64 / AIFF file, or None
  for other formats or a size the header does not state.

  Why our own chunk walker: libsndfile quietly clips the data chunk of these formats to the bytes
  actually in the file, so `soundfile.info(path).frames` of a truncated WAV is just a smaller
  number (and `read` returns that many samples without complaint). Only the header's own size
  field tells that samples are missing.
  """
  try:
    return _walk_chunks(path)
  except struct.error:  # a chunk header cut off: not a size we can compare; decode instead
    return None


def _walk_chunks(path: str) -> tuple[int, int] | None:
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(16)
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
      endian, pos, ds64 = "<", 12, None
    elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
      endian, pos, ds64 = ">", 12, None
    elif head == _W64_RIFF:
      pos = 40  # riff GUID (16) + size (8) + wave GUID (16)
      while pos + 24 <= size:  # chunk: GUID (16) + size (8, header included), 8-byte aligned
        f.seek(pos)
        guid, (n,) = f.read(16), struct.unpack("<Q", f.read(8))
        if guid == _W64_DATA:
          return n - 24, size - pos - 24
        if n < 24:
          return None
        pos += n + (-n % 8)
      return None
    else:
      return None
    while pos + 8 <= size:  # chunk: id (4) + size (4), padded to an even length
      f.seek(pos)
      cid, (n,) = f.read(4), struct.unpack(endian + "I", f.read(4))
      if cid == b"ds64":  # RF64: the real (64-bit) data size lives here
        ds64 = struct.unpack("<QQ", f.read(16))[1]
      elif cid == b"data" and endian == "<":
        n = ds64 if head[:4] == b"RF64" and n == 0xFFFFFFFF and ds64 is not None else n
        return None if n in _UNKNOWN_SIZES else (n, size - pos - 8)
      elif cid == b"SSND":  # AIFF: offset (4) + block size (4), then `offset` bytes, then data
        (offset,) = struct.unpack(">I", f.read(4))
        return n - 8 - offset, size - pos - 16 - offset
      pos += 8 + n + (n & 1)
  return None


def file_facts(path: str) -> tuple[int, int, int]:
  """(frames, sample_rate, channels) of an audio file that is present, decodable and whole, or
  AudioError naming the file and what is wrong (missing, symlink loop, unreadable, empty,
  truncated). Reads the header and, for formats without a size to compare, the last frames."""
  info = read_info(path)
  if info.frames <= 0:
    raise AudioError(f"{path}: empty audio (0 samples)")
  sizes = _data_chunk(path)
  if sizes is not None:
    declared, present = sizes
    if present < declared:
      raise AudioError(f"{path}: truncated (the header declares {declared} bytes of samples, "
                       f"the file holds {max(present, 0)})")
  else:  # FLAC, Ogg, MP3...: their frame count comes from the header; decode the last frames
    import soundfile as sf  # installed with the data stack; imported when a file is checked

    k = min(info.frames, 1024)
    try:
      with sf.SoundFile(path) as f:
        f.seek(info.frames - k)
        got = f.read(k, dtype="float32", always_2d=True).shape[0]
    except Exception as e:  # libsndfile's errors on a cut-off stream (failed seek, bad frame)
      raise AudioError(f"{path}: truncated or corrupt (cannot decode its last samples: {e})") from e
    if got != k:
      raise AudioError(f"{path}: truncated (the header says {info.frames} samples, decoding "
                       f"stops {k - got} short of that)")
  return info.frames, info.samplerate, info.channels


def _row_problem(row: dict, facts: tuple[int, int, int]) -> str | None:
  frames, sr, channels = facts
  if "sample_rate" in row and int(row["sample_rate"]) != sr:
    return (f"the file's sample rate is {sr} Hz, the row says {row['sample_rate']} (resampled "
            "after the manifest was built? rebuild the manifest)")
  if "n_samples" in row and int(row["n_samples"]) != frames:
    return (f"the file has {frames} samples ({channels} channel(s)) at {sr} Hz, the row says "
            f"n_samples={row['n_samples']} (changed after the manifest was built? rebuild it)")
  return None


def _load_cache(cache_path: str | None) -> dict[str, list]:
  if not cache_path or not os.path.exists(cache_path):
    return {}
  try:
    with open(cache_path) as f:
      data = json.load(f)
    if data.get("version") == _CACHE_VERSION and isinstance(data.get("files"), dict):
      return data["files"]
  except (OSError, ValueError, AttributeError):
    pass  # an unreadable cache is only a slower check: every file is checked again
  return {}


def _save_cache(cache_path: str, files: dict[str, list]) -> None:
  tmp = f"{cache_path}.{os.getpid()}.tmp"
  try:
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    with open(tmp, "w") as f:
      json.dump({"version": _CACHE_VERSION, "files": files}, f)
    os.replace(tmp, cache_path)
  except OSError as e:  # the cache only saves time; the check itself has passed or failed
    print(f"warning: could not write the file-check cache {cache_path}: {e}", file=sys.stderr)
    with contextlib.suppress(OSError):
      os.unlink(tmp)


def _manifest_lines(manifest: str) -> dict[str, int]:
  """Resolved audio path -> first line of `manifest` that names it (for error messages)."""
  base = os.path.dirname(os.path.abspath(manifest))
  lines: dict[str, int] = {}
  with contextlib.suppress(OSError), open(manifest) as f:
    for lineno, line in enumerate(f, 1):
      with contextlib.suppress(ValueError, TypeError, AttributeError):
        p = json.loads(line).get("path")
        if isinstance(p, str):
          lines.setdefault(os.path.normpath(os.path.join(base, p)), lineno)
  return lines


_CACHE_VERSION = 1
SHOWN_PROBLEMS = 5  # bad rows named in the one-line error; the rest are counted


def verify_files(rows: Sequence[dict], *, manifest: str = "", workers: int = 8,
                 cache_path: str | None = None) -> None:
  """Checks, before training, that every audio row's file is there and is what the row says.

  Per row with a `path` (rows without one -- text, images -- are skipped): the file exists (not a
  broken symlink or a symlink loop), its header decodes, its sample rate equals the row's
  `sample_rate`, its frame count equals the row's `n_samples`, and it is whole (WAV / RF64 /
  Wave64 / AIFF: the data chunk's declared size is present; other formats: the last frames
  decode). Each file is checked once, in `workers` threads.

  `cache_path`: a JSON file of the facts of files found whole, keyed by absolute path and valid
  while (size, mtime_ns) stay the same, so a re-run costs one `stat` per file; a file that changed
  is checked again. Written only when every row passes, so a refused run (e.g. in a workdir)
  leaves it as it was. `manifest`: the manifest's path, for `manifest:line` in the error.

  Raises ManifestError: one line naming the first few bad rows (`manifest:line: file: why`, or
  `row i: file: why` without a manifest) and how many rows are bad in all.
  """
  cache = _load_cache(cache_path)
  changed = False
  facts: dict[str, tuple[int, int, int] | str] = {}  # path -> facts, or why it is bad
  todo: list[tuple[str, int, int]] = []
  for row in rows:
    p = row.get("path")
    if not isinstance(p, str) or p in facts:
      continue
    try:
      st = os.stat(p)
    except OSError:
      facts[p] = missing_reason(p) or "cannot read the file's status"
      continue
    hit = cache.get(os.path.abspath(p))
    if hit and hit[:2] == [st.st_size, st.st_mtime_ns]:  # unchanged since it was found whole
      facts[p] = tuple(hit[2:5])
    else:
      facts[p] = ""
      todo.append((p, st.st_size, st.st_mtime_ns))

  def check(item):
    path, size, mtime = item
    try:
      return file_facts(path), size, mtime
    except AudioError as e:
      return str(e).removeprefix(f"{path}: "), size, mtime

  if todo:
    # libsndfile and file reads release the GIL: threads overlap the waits on the disk.
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as ex:
      for (path, _, _), (result, size, mtime) in zip(todo, ex.map(check, todo)):
        facts[path] = result
        if not isinstance(result, str):
          cache[os.path.abspath(path)] = [size, mtime, *result]
          changed = True
  bad: list[tuple[int, str, str]] = []  # (row index, path, why)
  n_checked = 0
  for i, row in enumerate(rows):
    p = row.get("path")
    if not isinstance(p, str):
      continue
    n_checked += 1
    f = facts[p]
    why = f if isinstance(f, str) else _row_problem(row, f)
    if why:
      bad.append((i, p, why))
  if not bad:
    if cache_path and changed:
      _save_cache(cache_path, cache)
    return
  lines = _manifest_lines(manifest) if manifest else {}

  def where(i, p):
    line = lines.get(os.path.normpath(os.path.abspath(p)))
    return f"{manifest}:{line}" if line else f"row {i}" + (f" of {manifest}" if manifest else "")

  shown = [f"{where(i, p)}: {p}: {why}" for i, p, why in bad[:SHOWN_PROBLEMS]]
  more = f"; ... and {len(bad) - SHOWN_PROBLEMS} more" if len(bad) > SHOWN_PROBLEMS else ""
  raise ManifestError(f"{len(bad)} of {n_checked} audio row(s) fail the file check: "
                      + "; ".join(shown) + more)


def _probe(path: str) -> tuple[int, int]:
  """(n_samples, sample_rate) after a full decode; AudioError names the file if it is bad."""
  frames, sr, _ = file_facts(path)  # also catches a truncated WAV, which decodes "fine", shorter
  # Decode everything (not only the header): a corrupt or NaN file must fail here, not at step
  # 10k of training.
  n = load_audio(path, target_sr=None).shape[0]
  if n != frames:
    raise AudioError(f"{path}: corrupt or truncated (header says {frames} samples, {n} read)")
  return n, sr


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
  ids = collections.defaultdict(list)
  for row in partial:
    ids[row["id"]].append(row["path"])
  dup = {k: v for k, v in ids.items() if len(v) > 1}
  if dup:
    k, v = next(iter(dup.items()))
    raise ManifestError(f"{root}: {len(dup)} id(s) name several files (layout {layout!r}), "
                        f"e.g. {k!r}: {', '.join(v)}")

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
    more = f"; ... and {len(bad) - SHOWN_PROBLEMS} more" if len(bad) > SHOWN_PROBLEMS else ""
    raise ManifestError(f"{len(bad)} bad audio file(s) under {root} (--skip-bad leaves them out "
                        "and lists them all): " + "; ".join(bad[:SHOWN_PROBLEMS]) + more)
  if not rows:
    raise ManifestError(f"{root}: all {len(bad)} audio file(s) are bad, no manifest to write")
  return rows, bad


def _check_writable(path: str) -> None:
  """Fails now (before a long build) if `path` cannot become a file: a folder, under a file, or
  in a folder we may not write."""
  if os.path.isdir(path):
    raise IsADirectoryError(errno.EISDIR, "a folder, not a manifest file", path)
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):  # the nearest existing ancestor (write_manifest makes the rest)
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(errno.ENOTDIR, "not a folder, cannot hold the manifest", parent)
  if not os.access(parent, os.W_OK):
    raise PermissionError(errno.EACCES, "cannot write the manifest in this folder", parent)


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
  _check_writable(args.out)
  rows, bad = build_manifest(args.root, args.layout, skip_bad=args.skip_bad)
  write_manifest(args.out, rows, relative=args.relative)
  speakers = {r["speaker"] for r in rows}
  print(f"wrote {args.out}: {len(rows)} rows, {len(speakers)} speakers")
  if bad:
    print(f"skipped {len(bad)} bad file(s):\n  " + "\n  ".join(bad), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(main, prog="python -m data_pipelines.manifest"))
