"""`python -m jaxspeech.extract`: HF-equal hidden states per file and layer; clear errors."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from jaxspeech import extract
from jaxspeech.audio import load_audio

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("hubert")
  torch.manual_seed(0)
  cfg = transformers.HubertConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    conv_dim=(32,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
  )
  model = transformers.HubertModel(cfg).eval()
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("audio")
  flac = sorted(glob.glob(os.path.join(SHARED, "librispeech-excerpt", "*", "*.flac")))[0]
  fsdd = os.path.join(SHARED, "fsdd", "recordings", "3_theo_7.wav")  # 8 kHz
  rng = np.random.default_rng(0)
  stereo = d / "stereo.wav"
  sf.write(stereo, rng.uniform(-0.3, 0.3, (12000, 2)).astype(np.float32), 16000)
  return [flac, fsdd, str(stereo)]


def test_features_equal_transformers(ckpt, audio_files, tmp_path):
  path, hf_model = ckpt
  out = tmp_path / "feats.npz"
  rc = extract.main(
    ["--checkpoint", str(path), "--audio", *audio_files, "--layers", "all", "--out", str(out)]
  )
  assert rc == 0
  feats = np.load(out)
  assert len(feats.files) == 3 * 3
  # HF's own pipeline: its feature extractor (do_normalize=True by default; the checkpoint has no
  # preprocessor_config.json), then the model.
  fe = transformers.Wav2Vec2FeatureExtractor()
  for f in audio_files:
    wav = load_audio(f)
    x = fe(wav, sampling_rate=16000, return_tensors="pt").input_values  # [1, S]
    with torch.no_grad():
      ref = hf_model(x, output_hidden_states=True).hidden_states
    stem = os.path.splitext(os.path.basename(f))[0]
    for i, r in enumerate(ref):
      got = feats[f"{stem}/layer_{i}"]
      assert got.dtype == np.float32 and got.shape == r.shape[1:]
      assert np.max(np.abs(got - r[0].numpy())) <= 1e-4


def test_preprocessor_config_do_normalize_false_feeds_raw_audio(ckpt, audio_files, tmp_path):
  import json
  import shutil

  path, hf_model = ckpt
  raw_dir = tmp_path / "raw"
  shutil.copytree(path, raw_dir)
  with open(raw_dir / "preprocessor_config.json", "w") as f:
    json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": False}, f)
  assert not extract.input_normalized(str(raw_dir)) and extract.input_normalized(str(path))
  out = tmp_path / "raw.npz"
  assert extract.main(["--checkpoint", str(raw_dir), "--audio", audio_files[0], "--layers", "-1",
                       "--out", str(out)]) == 0
  wav = load_audio(audio_files[0])
  with torch.no_grad():
    ref = hf_model(torch.from_numpy(wav)[None], output_hidden_states=True).hidden_states[-1]
  stem = os.path.splitext(os.path.basename(audio_files[0]))[0]
  assert np.max(np.abs(np.load(out)[f"{stem}/layer_2"] - ref[0].numpy())) <= 1e-4


def test_resampling_and_stereo(audio_files):
  wav8k, sr = sf.read(audio_files[1], dtype="float32")
  assert sr == 8000
  wav16 = load_audio(audio_files[1])
  assert abs(len(wav16) - 2 * len(wav8k)) <= 1
  # A band-limited signal survives the polyphase resampler: compare a 200 Hz tone.
  t = np.arange(8000) / 8000
  tone = np.sin(2 * np.pi * 200 * t).astype(np.float32)
  from jaxspeech.audio import resample

  up = resample(tone, 8000, 16000)
  ref = np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)
  assert np.max(np.abs(up[200:-200] - ref[200:-200])) < 1e-3
  st, _ = sf.read(audio_files[2], dtype="float32")
  np.testing.assert_allclose(load_audio(audio_files[2]), st.mean(1), atol=1e-7)


def test_layer_selection(ckpt, audio_files, tmp_path):
  path, _ = ckpt
  out = tmp_path / "f.npz"
  assert (
    extract.main(
      ["--checkpoint", str(path), "--audio", audio_files[0], "--layers", "0,-1", "--out", str(out)]
    )
    == 0
  )
  assert sorted(np.load(out).files) == sorted(
    [f"{os.path.splitext(os.path.basename(audio_files[0]))[0]}/layer_{i}" for i in (0, 2)]
  )
  with pytest.raises(ValueError, match="out of range"):
    extract.parse_layers("3", 2)


@pytest.mark.parametrize("kind", ["corrupt", "empty", "nan", "missing"])
def test_bad_audio_fails_naming_the_file(ckpt, audio_files, tmp_path, kind):
  path, _ = ckpt
  bad = tmp_path / f"bad_{kind}.wav"
  if kind == "corrupt":
    bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
  elif kind == "empty":
    sf.write(bad, np.zeros((0,), np.float32), 16000)
  elif kind == "nan":
    sf.write(bad, np.full((4000,), np.nan, np.float32), 16000, subtype="FLOAT")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxspeech.extract",
      "--checkpoint",
      str(path),
      "--audio",
      audio_files[0],
      str(bad),
      "--out",
      str(tmp_path / "x.npz"),
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 2  # a user error: one line, no traceback
  assert "Traceback" not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(lines) == 1 and str(bad) in lines[0]
  assert not (tmp_path / "x.npz").exists()


def test_out_is_written_at_exactly_the_path_given_and_printed(ckpt, audio_files, tmp_path, capsys):
  """`--out feats.bin` writes feats.bin (an .npz archive; numpy's savez would have written
  feats.bin.npz) and prints that path."""
  path, _ = ckpt
  out = tmp_path / "feats.bin"
  assert extract.main(["--checkpoint", str(path), "--audio", audio_files[0], "--layers", "-1",
                       "--out", str(out)]) == 0
  assert capsys.readouterr().out.strip().endswith(f"to {out}")
  assert sorted(os.listdir(tmp_path)) == ["feats.bin"]
  stem = os.path.splitext(os.path.basename(audio_files[0]))[0]
  assert np.load(out).files == [f"{stem}/layer_2"]
