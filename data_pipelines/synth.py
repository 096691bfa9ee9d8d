"""Synthetic multi-speaker speech with exact phone alignments (espeak-ng + MBROLA diphones).

espeak-ng turns text into an MBROLA `.pho` script (one phone a line with its duration in ms and
F0 targets); `mbrola` renders exactly those durations from recorded human diphones. The cumulative
durations are therefore the phone boundaries of the audio (the audio is 0-10 ms shorter than their
sum, with no drift; measured in tests and in `synth_stats.json`).

  python -m data_pipelines.synth --out DIR --num-utterances N [--voices us1,us2_high,...] \
    [--text-file F] --seed S

writes `DIR/wavs/*.wav` (16 kHz PCM16), `DIR/manifest.jsonl` (paths relative to DIR),
`DIR/phones.txt` (the phone inventory; line number = id), `DIR/frame_labels_10ms.npz` (one int16
array of phone ids per utterance id, 100 frames/s, -1 where no phone) and `DIR/synth_stats.json`.
Output is deterministic for a seed and cached: a second call with the same arguments returns at
once. Speakers are MBROLA voices plus pitch / voice-quality variants (`SPEAKERS`); speakers in
`HELD_OUT` get `split: "test"`, the rest `split: "train"` (a speaker-held-out split).

MBROLA voices are licensed for non-commercial / research use only (Debian non-free).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import soundfile as sf

from data_pipelines import phones as phones_lib
from data_pipelines.manifest import read_manifest, write_manifest
from jaxspeech.audio import SAMPLE_RATE, resample
from jaxspeech.errors import UserError, run_cli

MBROLA_DIR = "/usr/share/mbrola"
_VERSION = 1  # bump when the output format or rendering changes (invalidates caches)


@dataclasses.dataclass(frozen=True)
class Speaker:
  """One synthetic speaker: an MBROLA voice plus espeak/mbrola settings.

  voice: MBROLA database name (us1, us2, us3, en1).
  pitch: espeak `-p` (0-99, 50 = the voice's default F0 contour).
  rate: espeak `-s` words per minute (durations; alignments follow them exactly).
  f0_ratio: mbrola `-f`, scales every F0 target.
  voice_freq: mbrola `-l` render rate; resampled to 16 kHz this scales the formants by
    voice_freq / 16000 while F0 and durations stay (a different vocal-tract length).
  """

  voice: str
  pitch: int = 50
  rate: int = 160
  f0_ratio: float = 1.0
  voice_freq: int = 16_000


SPEAKERS = {
  "us1": Speaker("us1"),
  "us1_low": Speaker("us1", pitch=40, rate=150, f0_ratio=0.85, voice_freq=15_000),
  "us2": Speaker("us2"),
  "us2_high": Speaker("us2", pitch=60, rate=175, f0_ratio=1.25, voice_freq=17_000),
  "us3": Speaker("us3", rate=170),
  "us3_deep": Speaker("us3", pitch=35, rate=145, f0_ratio=0.8, voice_freq=14_500),
  "en1": Speaker("en1"),
  "en1_high": Speaker("en1", pitch=65, rate=180, f0_ratio=1.3, voice_freq=17_500),
}
HELD_OUT = ("us2_high", "en1_high")  # test-split speakers: unseen voice variants

# Sentence grammar (the project's own word lists). Words are chosen so that every phone of the
# US MBROLA set occurs (e.g. measure/Z, boy/OI, north/T, bird/r=, water/4).
_W = {
  "det": "the|a|this|that|every|one|my|her|our|their",
  "adj": "young|old|quiet|yellow|brown|thin|huge|cheap|bright|good|usual|noisy|cold|wet|shy|"
  "clever|tired|happy|strange|loud|smooth|gentle|dark|large",
  "noun": "boy|girl|teacher|judge|king|dog|cat|horse|bird|child|farmer|sailor|mother|father|"
  "doctor|pilot|singer|robot|monkey|fisherman|nurse|lawyer|student|writer",
  "thing": "chair|book|coin|measure|garage|house|ship|river|mountain|jungle|village|bottle|"
  "water|letter|window|picture|church|fish|engine|treasure|bridge|wagon|cloth|voice",
  "verb": "found|painted|pushed|watched|carried|opened|lost|washed|touched|joined|measured|"
  "borrowed|hid|threw|bought|visited|closed|shook|fixed|loved|sold|noticed|pulled|moved",
  "adv": "slowly|quickly|again|today|yesterday|at noon|with joy|without a word|on thursday|"
  "in the morning|after lunch|near the shore|by the fire|under the bridge|all the time",
  "name": "john|mary|peter|sarah|thomas|george|ruth|charles|joyce|howard|vivian|zoe",
  "num": "two|three|four|five|six|seven|eight|nine|ten|twelve|twenty|thirty",
}
WORDS = {k: v.split("|") for k, v in _W.items()}
_TEMPLATES = (
  "{det} {adj} {noun} {verb} {det} {adj} {thing} {adv}.",
  "{name} {verb} the {thing} {adv}.",
  "did {det} {noun} see the {adj} {thing}?",
  "{name} and {name} {verb} {num} {adj} {thing}s.",
  "the {thing} was {adj}, so the {noun} {verb} it {adv}.",
  "{num} {adj} {noun}s {verb} {det} {thing} near the {thing}.",
)


def generate_sentences(n: int, seed: int) -> list[str]:
  """`n` sentences from the built-in grammar, deterministic for `seed`."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tpl = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    parts, i = [], 0
    while i < len(tpl):  # fill each {slot} independently (str.format would reuse one choice)
      j = tpl.find("{", i)
      if j < 0:
        parts.append(tpl[i:])
        break
      k = tpl.index("}", j)
      parts += [tpl[i:j], WORDS[tpl[j + 1 : k]][rng.integers(len(WORDS[tpl[j + 1 : k]]))]]
      i = k + 1
    s = "".join(parts)
    out.append(s[0].upper() + s[1:])
  return out


def parse_pho(pho: str) -> list[tuple[str, float]]:
  """MBROLA .pho text -> [(phone, duration_ms)]; comments (;) and blank lines skipped."""
  out = []
  for line in pho.splitlines():
    f = line.split()
    if not f or f[0].startswith(";"):
      continue
    out.append((f[0], float(f[1])))
  return out


def pho_to_alignment(segments: list[tuple[str, float]]) -> list[list]:
  """[(phone, ms)] -> [[canonical_phone, start_s, end_s]], adjacent silences merged.

  Boundaries are cumulative sums in integer milliseconds (exact; espeak prints integers)."""
  ali, t_ms = [], 0.0
  for ph, dur in segments:
    ph = phones_lib.canonical_phone(ph)
    start, t_ms = t_ms, t_ms + dur
    if ali and ph == phones_lib.SILENCE and ali[-1][0] == ph:
      ali[-1][2] = t_ms / 1000
    elif dur > 0:
      ali.append([ph, start / 1000, t_ms / 1000])
  return ali


class MissingToolError(UserError, RuntimeError):
  """espeak-ng, mbrola or an MBROLA voice is not installed; the message says which and how."""


def check_tools(voices) -> None:
  """Raises MissingToolError naming what is missing (espeak-ng, mbrola, a voice database)."""
  missing = [b for b in ("espeak-ng", "mbrola") if shutil.which(b) is None]
  missing += [
    f"{MBROLA_DIR}/{v}/{v} (Debian package mbrola-{v})"
    for v in sorted(set(voices))
    if not os.path.exists(f"{MBROLA_DIR}/{v}/{v}")
  ]
  if missing:
    raise MissingToolError(
      "synthetic speech needs espeak-ng and MBROLA voices; missing: "
      + ", ".join(missing)
      + ". Run scripts/setup.sh (apt: espeak-ng mbrola mbrola-us1 mbrola-us2 mbrola-us3 "
      "mbrola-en1, from contrib/non-free)."
    )


def espeak_pho(text: str, spk: Speaker) -> str:
  """espeak-ng's MBROLA script (.pho) of `text` for speaker `spk` (its voice, pitch, rate)."""
  pho = subprocess.run(
    ["espeak-ng", "-v", f"mb-{spk.voice}", "-q", "--pho", "-p", str(spk.pitch),
     "-s", str(spk.rate), text],
    check=True, capture_output=True, text=True,
  ).stdout  # fmt: skip
  if not parse_pho(pho):
    raise RuntimeError(f"espeak-ng printed no phones for voice mb-{spk.voice}: {text!r}")
  return pho


def text_to_phones(text: str, speaker: str = "us1") -> list[str]:
  """The phone sequence (silences `_` included, as in the corpus's alignments) that `render`
  would speak for `text` with speaker `speaker`: what a TTS model trained here reads."""
  check_tools([])  # espeak-ng (and mbrola) on PATH
  if speaker not in SPEAKERS:
    raise ValueError(f"unknown speaker {speaker!r}; choose from {sorted(SPEAKERS)}")
  return [p for p, _, _ in pho_to_alignment(parse_pho(espeak_pho(text, SPEAKERS[speaker])))]


def render(text: str, spk: Speaker) -> tuple[np.ndarray, list[list], int]:
  """Synthesises `text`. Returns (int16 audio [S] at 16 kHz, alignment, raw sample count)."""
  pho = espeak_pho(text, spk)
  segments = parse_pho(pho)
  db = f"{MBROLA_DIR}/{spk.voice}/{spk.voice}"
  cmd = ["mbrola", "-e", "-f", str(spk.f0_ratio), "-l", str(spk.voice_freq), db, "-", "-.raw"]
  raw = subprocess.run(cmd, input=pho.encode(), check=True, capture_output=True).stdout
  wav = np.frombuffer(raw, np.int16)
  if wav.size == 0:
    raise RuntimeError(f"mbrola rendered no audio for voice {spk.voice}: {text!r}")
  # `-l VF` renders at VF Hz with the durations in seconds unchanged; back to 16 kHz.
  audio = resample(wav.astype(np.float32) / 32768, spk.voice_freq, SAMPLE_RATE)
  audio = np.clip(np.round(audio * 32768), -32768, 32767).astype(np.int16)
  return audio, pho_to_alignment(segments), wav.size


def _config_hash(sentences, speaker_names) -> str:
  h = hashlib.sha256()
  h.update(json.dumps({
    "v": _VERSION, "sentences": sentences, "held_out": HELD_OUT,
    "speakers": {n: dataclasses.asdict(SPEAKERS[n]) for n in speaker_names},
  }, sort_keys=True).encode())  # fmt: skip
  for tool in ("espeak-ng", "mbrola"):
    path = shutil.which(tool)
    h.update((path or "").encode() + str(os.path.getmtime(path) if path else 0).encode())
  return h.hexdigest()[:16]


def synthesize_corpus(
  out_dir: str | os.PathLike,
  num_utterances: int,
  *,
  seed: int = 0,
  voices: list[str] | None = None,
  sentences: list[str] | None = None,
  num_threads: int = 4,
) -> str:
  """Renders a corpus into `out_dir` (cached) and returns its manifest path.

  Utterance i is spoken by speaker `voices[i % len(voices)]`; its sentence is line
  `i % len(sentences)` of `sentences`, or from the grammar (seeded) when none are given.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  voices = list(voices or SPEAKERS)
  unknown = [v for v in voices if v not in SPEAKERS]
  if unknown:
    raise ValueError(f"unknown speaker(s) {unknown}; choose from {sorted(SPEAKERS)}")
  if num_utterances < 1:
    raise ValueError("num_utterances must be >= 1")
  if sentences is not None:
    sentences = [s.strip() for s in sentences if s.strip()]
    if not sentences:
      raise ValueError("the text file holds no sentences")
    texts = [sentences[i % len(sentences)] for i in range(num_utterances)]
  else:
    texts = generate_sentences(num_utterances, seed)
  key = _config_hash(texts, voices)
  manifest_path = os.path.join(out_dir, "manifest.jsonl")
  stamp = os.path.join(out_dir, "DONE")
  if os.path.exists(stamp) and open(stamp).read().strip() == key:
    return manifest_path
  check_tools(SPEAKERS[v].voice for v in voices)

  t0 = time.perf_counter()
  tmp = out_dir + f".tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "wavs"))
  jobs = [(f"{voices[i % len(voices)]}_{i:05d}", voices[i % len(voices)], t)
          for i, t in enumerate(texts)]  # fmt: skip

  def one(job):
    uid, spk_name, text = job
    audio, ali, _ = render(text, SPEAKERS[spk_name])
    sf.write(os.path.join(tmp, "wavs", uid + ".wav"), audio, SAMPLE_RATE, subtype="PCM_16")
    return audio.size, ali

  # Each job is two subprocesses; threads keep both cores busy while Python waits on pipes.
  with concurrent.futures.ThreadPoolExecutor(num_threads) as ex:
    results = list(ex.map(one, jobs))

  inventory = list(phones_lib.US_PHONES)
  extra = sorted({s[0] for _, ali in results for s in ali} - set(inventory))
  inventory += extra  # phones outside the US set (none expected); kept, never dropped
  phone_to_id = {p: i for i, p in enumerate(inventory)}
  rows, labels, diffs = [], {}, []
  for (uid, spk_name, text), (n, ali) in zip(jobs, results):
    rows.append({
      "path": os.path.join(tmp, "wavs", uid + ".wav"), "n_samples": n,
      "sample_rate": SAMPLE_RATE, "speaker": spk_name, "text": text,
      "phones": " ".join(s[0] for s in ali), "alignment": ali, "id": uid,
      "split": "test" if spk_name in HELD_OUT else "train",
    })  # fmt: skip
    diffs.append(ali[-1][2] - n / SAMPLE_RATE)
    labels[uid] = phones_lib.frame_labels(
      ali, phones_lib.num_frames(n, SAMPLE_RATE, 100), 100, phone_to_id
    ).astype(np.int16)
  write_manifest(os.path.join(tmp, "manifest.jsonl"), rows, relative=True)
  phones_lib.write_inventory(os.path.join(tmp, "phones.txt"), inventory)
  np.savez(os.path.join(tmp, "frame_labels_10ms.npz"), **labels)
  used = sorted({s[0] for _, ali in results for s in ali})
  stats = {
    "num_utterances": len(rows), "speakers": voices, "seconds_of_audio":
    round(sum(r["n_samples"] for r in rows) / SAMPLE_RATE, 3),
    "render_seconds": round(time.perf_counter() - t0, 3),
    "alignment_minus_audio_s": {"min": min(diffs), "max": max(diffs),
                                "max_abs": max(abs(d) for d in diffs)},
    "phones_used": len(used), "inventory_size": len(inventory),
  }  # fmt: skip
  with open(os.path.join(tmp, "synth_stats.json"), "w") as f:
    json.dump(stats, f, indent=1)
  with open(os.path.join(tmp, "DONE"), "w") as f:
    f.write(key + "\n")
  shutil.rmtree(out_dir, ignore_errors=True)
  os.rename(tmp, out_dir)  # the cache appears complete or not at all
  return manifest_path


def default_cache_dir() -> str:
  """$JAXSPEECH_CACHE, else ~/.cache/jaxspeech."""
  return os.environ.get("JAXSPEECH_CACHE", os.path.expanduser("~/.cache/jaxspeech"))


def built_in_corpus(
  cache_dir: str | os.PathLike | None = None, num_utterances: int = 400, seed: int = 0
) -> str:
  """The built-in corpus (all 8 `SPEAKERS`, grammar sentences; ~17 min of audio by default).

  Returns the manifest path (cached under `cache_dir/synth-<n>-<seed>`). Rows carry `alignment`,
  `split` ("train" / held-out-speaker "test"); `phones.txt` sits beside the manifest.
  """
  cache_dir = os.fspath(cache_dir or default_cache_dir())
  out = os.path.join(cache_dir, f"synth-{num_utterances}-{seed}")
  return synthesize_corpus(out, num_utterances, seed=seed)


def held_out_corpus(
  speaker: str, num_utterances: int, *, seed: int = 1, exclude: set[str] | frozenset = frozenset(),
  cache_dir: str | os.PathLike | None = None,
) -> str:
  """`num_utterances` grammar sentences NOT in `exclude` (lower-cased texts, e.g. a TTS model's
  training sentences) rendered for `speaker`: reference renderings of unseen text for a voice.

  Sentences are drawn with `seed` and de-duplicated; cached under
  `cache_dir/heldout-<speaker>-<n>-<seed>-<hash of exclude>`. Returns the manifest path."""
  exclude = {t.strip().lower() for t in exclude}
  sentences, seen, draw = [], set(), 0
  while len(sentences) < num_utterances:
    draw += 1
    if draw > 50:
      raise ValueError(f"held_out_corpus: fewer than {num_utterances} unseen sentences")
    for s in generate_sentences(4 * num_utterances, seed * 1000 + draw):
      key = s.strip().lower()
      if key not in exclude and key not in seen and len(sentences) < num_utterances:
        seen.add(key)
        sentences.append(s)
  digest = hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()[:10]
  cache_dir = os.fspath(cache_dir or default_cache_dir())
  out = os.path.join(cache_dir, f"heldout-{speaker}-{num_utterances}-{seed}-{digest}")
  return synthesize_corpus(out, num_utterances, voices=[speaker], sentences=sentences)


def load_corpus(manifest_path: str | os.PathLike) -> tuple[list[dict], list[str]]:
  """(manifest rows, phone inventory) of a synthesized corpus."""
  rows = read_manifest(manifest_path)
  inv = phones_lib.read_inventory(os.path.join(os.path.dirname(manifest_path), "phones.txt"))
  return rows, inv


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", required=True, help="output folder (cached by content)")
  ap.add_argument("--num-utterances", type=int, required=True)
  ap.add_argument("--voices", default=",".join(SPEAKERS), help=f"from {','.join(SPEAKERS)}")
  ap.add_argument("--text-file", help="one sentence a line (default: the built-in grammar)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if args.num_utterances < 1:
    ap.error(f"--num-utterances={args.num_utterances}: must be >= 1")
  unknown = sorted(set(args.voices.split(",")) - set(SPEAKERS))
  if unknown:
    ap.error(f"--voices: unknown speaker(s) {unknown}; choose from {sorted(SPEAKERS)}")
  sentences = None
  if args.text_file:
    with open(args.text_file) as f:
      sentences = f.read().splitlines()
    if not any(x.strip() for x in sentences):
      ap.error(f"--text-file {args.text_file}: holds no sentences")
  t0 = time.perf_counter()
  path = synthesize_corpus(
    args.out, args.num_utterances, seed=args.seed, voices=args.voices.split(","),
    sentences=sentences,
  )  # fmt: skip
  with open(os.path.join(os.path.dirname(path), "synth_stats.json")) as f:
    stats = json.load(f)
  print(f"{path} ({time.perf_counter() - t0:.1f} s): {json.dumps(stats)}")
  return 0


if __name__ == "__main__":
  sys.exit(run_cli(main, prog="python -m data_pipelines.synth"))
