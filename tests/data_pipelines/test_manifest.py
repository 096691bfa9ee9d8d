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


def test_cli_bad_out_one_line_exit_2_no_tmp(tmp_path):
  root = tmp_path / "root" / "spk"
  root.mkdir(parents=True)
  sf.write(root / "a.wav", np.zeros(160, np.float32), 16000)
  (tmp_path / "out").mkdir()
  (tmp_path / "file").write_text("x")
  for out in (tmp_path / "out", tmp_path / "file" / "m.jsonl"):
    r = run_cli("--root", str(root.parent), "--layout", "folder", "--out", str(out))
    assert r.returncode == 2 and r.stdout == "", r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m data_pipelines.manifest: error: ")
    assert str(out if out.name == "out" else out.parent) in lines[0]
  assert sorted(os.listdir(tmp_path)) == ["file", "out", "root"]  # no m.jsonl.tmp anywhere
  assert not os.listdir(tmp_path / "out")
  # Bad files: one line too (the first few named, and their count), exit 2.
  (root / "bad.wav").write_bytes(b"RIFF\x00\x10\x00\x00WAVEfmt " + b"\x01" * 64)
  r = run_cli("--root", str(root.parent), "--layout", "folder", "--out", str(tmp_path / "m.jsonl"))
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "bad.wav" in r.stderr
  # argparse's own errors keep argparse's usage line and exit 2.
  r = run_cli("--layout", "folder")
  assert r.returncode == 2 and "usage:" in r.stderr and "--root" in r.stderr


def test_write_manifest_failure_leaves_no_tmp(tmp_path):
  def rows():
    yield {"path": str(tmp_path / "a.wav"), "n_samples": 1, "sample_rate": 16000, "speaker": "s"}
    raise RuntimeError("disk on fire")

  out = tmp_path / "d" / "m.jsonl"
  with pytest.raises(RuntimeError, match="disk on fire"):
    manifest.write_manifest(out, rows())
  assert os.listdir(tmp_path / "d") == []
  with pytest.raises(IsADirectoryError):
    manifest.write_manifest(tmp_path / "d", [])


def test_folder_ids_unique_and_symlink_loop_named(tmp_path):
  spk = tmp_path / "root" / "spk"
  spk.mkdir(parents=True)
  x = np.random.default_rng(0).uniform(-0.5, 0.5, 8000).astype(np.float32)
  sf.write(spk / "x.ogg", x, 16000, format="OGG", subtype="VORBIS")
  sf.write(spk / "x.flac", x, 16000)
  sf.write(spk / "y.wav", x, 16000)
  rows, _ = manifest.build_manifest(tmp_path / "root", "folder")
  assert sorted(r["id"] for r in rows) == ["spk/x.flac", "spk/x.ogg", "spk/y"]
  os.symlink(spk / "loop.wav", spk / "loop.wav")
  with pytest.raises(manifest.ManifestError, match=r"1 bad audio file.*loop\.wav: symlink loop"):
    manifest.build_manifest(tmp_path / "root", "folder")
  # Two files of one LibriSpeech utterance: an error naming both, not two rows with one id.
  ls = tmp_path / "ls"
  ls.mkdir()
  sf.write(ls / "1-2-3.flac", x, 16000)
  sf.write(ls / "1-2-3.wav", x, 16000)
  with pytest.raises(manifest.ManifestError, match=r"'1-2-3': .*1-2-3\.flac, .*1-2-3\.wav"):
    manifest.build_manifest(ls, "librispeech")


def test_data_cli_errors_one_line(tmp_path):
  (tmp_path / "d").mkdir()
  cases = [  # (module, args, expected piece of the one line)
    ("data_pipelines.tabular", ["two_gaussians", "--num-rows", "4", "--out", str(tmp_path / "d")],
     f"a folder, not a manifest file: {tmp_path / 'd'}"),
    ("data_pipelines.text", ["--text-file", str(tmp_path / "no.txt"), "--out",
                             str(tmp_path / "t.jsonl")], f"{tmp_path / 'no.txt'}"),
  ]
  for module, args, piece in cases:
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"python -m {module}: error: ") and piece in lines[0]
  r = subprocess.run([sys.executable, "-m", "data_pipelines.synth", "--out", str(tmp_path / "s"),
                      "--num-utterances", "0"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2 and "usage:" in r.stderr and "must be >= 1" in r.stderr
  assert os.listdir(tmp_path) == ["d"] and not os.listdir(tmp_path / "d")
