import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import manifest
from tests.data_pipelines.conftest import shared

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "data_pipelines.manifest", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_fsdd_cli(tmp_path):
  root = shared("fsdd")
  out = tmp_path / "fsdd.jsonl"
  r = run_cli("--root", root, "--layout", "fsdd", "--out", str(out))
  assert r.returncode == 0, r.stderr
  rows = manifest.read_manifest(out)
  assert len(rows) == 3000
  assert len({r["speaker"] for r in rows}) == 6
  assert {r["sample_rate"] for r in rows} == {8000}
  # FSDD's own split: utterance index 0-4 is test -> 10 digits x 6 speakers x 5.
  assert sum(r["split"] == "test" for r in rows) == 10 * 6 * 5
  for r in rows[:50]:
    assert r["n_samples"] == sf.info(r["path"]).frames
    digit = int(os.path.basename(r["path"])[0])
    assert r["digit"] == digit and r["text"] == manifest.DIGITS[digit]


def test_librispeech_cli(tmp_path):
  out = tmp_path / "ls.jsonl"
  r = run_cli("--root", shared("librispeech-excerpt"), "--layout", "librispeech", "--out", str(out))
  assert r.returncode == 0, r.stderr
  rows = manifest.read_manifest(out)
  assert len(rows) == 100 and len({r["speaker"] for r in rows}) == 10
  for r in rows:
    assert os.path.basename(r["path"]).startswith(r["speaker"] + "-")
    assert r["n_samples"] == sf.info(r["path"]).frames


def test_speechbrain_cli_alignments(tmp_path):
  root = shared("speechbrain-samples", "ASR")
  out = tmp_path / "sb.jsonl"
  assert run_cli("--root", root, "--layout", "speechbrain", "--out", str(out)).returncode == 0
  rows = manifest.read_manifest(out)
  assert len(rows) == 12
  aligned = [r for r in rows if "alignment" in r]
  with_ends = sum("ground_truth_phn_ends" in e for f in ("ASR_train.json", "ASR_dev.json")
                  for e in json.load(open(os.path.join(root, f))).values())
  assert with_ends > 0 and len(aligned) == with_ends
  for r in aligned:
    ali = r["alignment"]
    assert len(ali) == len(r["phones"].split())
    starts, ends = np.array([a[1] for a in ali]), np.array([a[2] for a in ali])
    assert np.all(ends > starts) and np.allclose(starts[1:], ends[:-1])
    # Phone end times lie within the audio (end of last phone <= duration + 10 ms).
    assert ends[-1] <= r["n_samples"] / r["sample_rate"] + 0.01


def _bad_folder(tmp_path):
  spk = tmp_path / "root" / "spk1"
  spk.mkdir(parents=True)
  rng = np.random.default_rng(0)
  sf.write(spk / "good.wav", rng.uniform(-0.5, 0.5, 4000).astype(np.float32), 16000)
  sf.write(spk / "empty.wav", np.zeros((0,), np.float32), 16000)  # valid header, 0 samples
  # A RIFF/WAVE file whose format chunk is garbage.
  (spk / "corrupt.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt " + rng.bytes(600))
  return tmp_path / "root"


def test_bad_files_named_and_skippable(tmp_path):
  root = _bad_folder(tmp_path)
  out = tmp_path / "m.jsonl"
  r = run_cli("--root", str(root), "--layout", "folder", "--out", str(out))
  assert r.returncode != 0 and not out.exists()
  assert "corrupt.wav" in r.stderr and "empty.wav" in r.stderr and "good.wav" not in r.stderr
  r = run_cli("--root", str(root), "--layout", "folder", "--out", str(out), "--skip-bad")
  assert r.returncode == 0, r.stderr
  assert "corrupt.wav" in r.stderr and "empty.wav" in r.stderr and "skipped 2" in r.stderr
  rows = manifest.read_manifest(out)
  assert [os.path.basename(r["path"]) for r in rows] == ["good.wav"]
  assert rows[0]["speaker"] == "spk1" and rows[0]["n_samples"] == 4000


def test_nan_audio_rejected(tmp_path):
  d = tmp_path / "root" / "a"
  d.mkdir(parents=True)
  x = np.zeros(1000, np.float32)
  x[10] = np.nan
  sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")
  with pytest.raises(manifest.ManifestError, match="nan.wav.*NaN"):
    manifest.build_manifest(tmp_path / "root", "folder")


def test_relative_paths_roundtrip(tmp_path):
  wav = tmp_path / "data" / "x.wav"
  wav.parent.mkdir()
  sf.write(wav, np.zeros(160, np.float32), 16000)
  rows = [{"path": str(wav), "n_samples": 160, "sample_rate": 16000, "speaker": "a",
           "alignment": [["_", 0.0, 0.01]]}]
  out = tmp_path / "m" / "man.jsonl"
  manifest.write_manifest(out, rows, relative=True)
  stored = json.loads(out.read_text())
  assert stored["path"] == os.path.join("..", "data", "x.wav")
  back = manifest.read_manifest(out)
  assert back[0]["path"] == str(wav) and back[0]["alignment"] == [["_", 0.0, 0.01]]


def test_malformed_row_names_line(tmp_path):
  out = tmp_path / "m.jsonl"
  out.write_text('{"path": "a.wav", "n_samples": 1, "sample_rate": 16000, "speaker": "s"}\n'
                 '{"path": "b.wav"}\n')
  with pytest.raises(manifest.ManifestError, match=r"m.jsonl:2: missing field"):
    manifest.read_manifest(out)
