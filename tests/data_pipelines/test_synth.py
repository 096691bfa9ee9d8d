import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import phones, synth
from data_pipelines.manifest import read_manifest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(autouse=True)
def _need_tools():
  try:
    synth.check_tools(s.voice for s in synth.SPEAKERS.values())
  except RuntimeError as e:
    pytest.skip(str(e))


def test_cli_200_utterances_alignment_and_inventory(tmp_path):
  out = tmp_path / "corpus"
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "data_pipelines.synth", "--out", str(out),
                      "--num-utterances", "200", "--seed", "0"], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)  # fmt: skip
  elapsed = time.perf_counter() - t0
  assert r.returncode == 0, r.stderr
  assert elapsed < 120, f"200 utterances took {elapsed:.1f} s"
  rows = read_manifest(out / "manifest.jsonl")
  assert len(rows) == 200
  voices = {synth.SPEAKERS[r["speaker"]].voice for r in rows}
  assert len(voices) >= 4 and len({r["speaker"] for r in rows}) == 8
  labels = np.load(out / "frame_labels_10ms.npz")
  inv = phones.read_inventory(out / "phones.txt")
  used = set()
  for r in rows:
    audio = sf.read(r["path"], dtype="float32")[0]
    assert audio.shape[0] == r["n_samples"] and r["sample_rate"] == 16000
    ali = r["alignment"]
    assert abs(ali[-1][2] - audio.shape[0] / 16000) <= 0.010, r["id"]
    assert all(a[1] < a[2] for a in ali) and all(a[2] == b[1] for a, b in zip(ali, ali[1:]))
    assert ali[0][1] == 0.0
    lab = labels[r["id"]]
    assert lab.shape[0] == phones.num_frames(r["n_samples"], 16000, 100)
    assert lab.min() >= 0  # every 10 ms frame of the audio has a phone
    used |= {a[0] for a in ali}
  assert len(used) >= 35 and used <= set(inv)
  stats = json.loads((out / "synth_stats.json").read_text())
  assert stats["phones_used"] == len(used)
  # The split holds out whole speakers.
  test_spk = {r["speaker"] for r in rows if r["split"] == "test"}
  train_spk = {r["speaker"] for r in rows if r["split"] == "train"}
  assert test_spk == set(synth.HELD_OUT) and not test_spk & train_spk


def test_labels_match_the_audio(synth_corpus):
  """Frames labelled silence are much quieter than frames labelled vowels: the labels are in
  the right place in the audio (an offset of a phone or more would mix them)."""
  rows, inv = synth.load_corpus(synth_corpus)
  p2i = {p: i for i, p in enumerate(inv)}
  vowels = {p2i[v] for v in ("i", "A", "O", "u", "I", "E", "{", "V", "EI", "AI", "@U", "aU")}
  sil, vow = [], []
  for r in rows:
    x = sf.read(r["path"], dtype="float32")[0]
    n = phones.num_frames(len(x), 16000, 100)
    rms = np.sqrt((x[: n * 160].reshape(n, 160) ** 2).mean(1))  # [F]
    lab = phones.frame_labels(r["alignment"], n, 100, p2i)
    sil += list(rms[lab == p2i["_"]])
    vow += list(rms[np.isin(lab, list(vowels))])
  assert np.median(vow) > 20 * np.median(sil)


def test_deterministic_and_cached(tmp_path):
  a = synth.synthesize_corpus(tmp_path / "a", 6, seed=7, voices=["us1", "en1_high"])
  b = synth.synthesize_corpus(tmp_path / "b", 6, seed=7, voices=["us1", "en1_high"])
  c = synth.synthesize_corpus(tmp_path / "c", 6, seed=8, voices=["us1", "en1_high"])
  ra, rb, rc = read_manifest(a), read_manifest(b), read_manifest(c)
  for x, y in zip(ra, rb):
    assert np.array_equal(sf.read(x["path"])[0], sf.read(y["path"])[0])
    assert x["alignment"] == y["alignment"] and x["text"] == y["text"]
  assert [x["text"] for x in ra] != [x["text"] for x in rc]
  mtime = os.path.getmtime(a)
  t0 = time.perf_counter()
  assert synth.synthesize_corpus(tmp_path / "a", 6, seed=7, voices=["us1", "en1_high"]) == a
  assert time.perf_counter() - t0 < 1.0 and os.path.getmtime(a) == mtime


def test_text_file(tmp_path):
  tf = tmp_path / "t.txt"
  tf.write_text("Hello there.\n\nA measure of joy.\n")
  r = subprocess.run([sys.executable, "-m", "data_pipelines.synth", "--out", str(tmp_path / "o"),
                      "--num-utterances", "3", "--voices", "us2,us3", "--text-file", str(tf),
                      "--seed", "1"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
  assert r.returncode == 0, r.stderr
  rows = read_manifest(tmp_path / "o" / "manifest.jsonl")
  assert [r["text"] for r in rows] == ["Hello there.", "A measure of joy.", "Hello there."]
  assert [r["speaker"] for r in rows] == ["us2", "us3", "us2"]
  assert "Z" in rows[1]["phones"].split()  # "measure"


def test_frame_labels_against_brute_force():
  rng = np.random.default_rng(0)
  bounds = np.cumsum(rng.uniform(0.01, 0.2, 30))
  ali = [[f"p{i % 7}", float(a), float(b)] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
  p2i = {f"p{i}": i for i in range(7)}
  for rate, offset in ((50, 0.0), (100, 0.0), (50, 0.37)):
    n = int((bounds[-1] + 0.3) * rate)
    got = phones.frame_labels(ali, n, rate, p2i, offset_s=offset)
    for i in range(n):
      c = offset + (i + 0.5) / rate
      hit = [p2i[p] for p, s, e in ali if s <= c < e]
      assert got[i] == (hit[0] if hit else -1)
  with pytest.raises(KeyError, match="zz"):
    phones.frame_labels([["zz", 0, 1]], 5, 50, p2i)


def test_en1_phones_map_onto_us_set():
  assert phones.canonical_phone("Q") in phones.US_PHONES
  assert all(phones.canonical_phone(p) in phones.US_PHONES for p in phones._TO_US)
  assert len(phones.US_PHONES) == len(set(phones.US_PHONES)) >= 35
