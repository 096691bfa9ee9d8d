"""Files checked before step 1 (`manifest.verify_files`, `train.data.verify_training_data`) and
while reading (`pipeline.ManifestSource`): every fault is injected for real into files under
tmp_path (deleted, truncated, resampled, replaced, symlink loops)."""

import os

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from data_pipelines import manifest, pipeline
from jaxspeech.audio import AudioError
from jaxspeech.errors import is_user_error, one_line


def _wav(path, n=4000, sr=16000, channels=1, fmt=None, subtype=None):
  x = np.random.default_rng(n).uniform(-0.5, 0.5, (n, channels)).astype(np.float32)
  sf.write(path, x, sr, format=fmt, subtype=subtype)
  return {"path": str(path), "n_samples": n, "sample_rate": sr, "speaker": "s"}


def _corpus(tmp_path, n_files=4, **kw):
  """n_files WAVs and their manifest (relative paths, as the synthetic corpus writes them)."""
  (tmp_path / "wavs").mkdir()
  rows = [_wav(tmp_path / "wavs" / f"u{i}.wav", n=3000 + 100 * i, **kw) for i in range(n_files)]
  path = tmp_path / "m.jsonl"
  manifest.write_manifest(path, rows, relative=True)
  return str(path), manifest.read_manifest(path)


def _truncate(path, keep=0.5):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[: int(len(data) * keep)])


def test_intact_corpus_passes_and_missing_file_names_manifest_line(tmp_path):
  m, rows = _corpus(tmp_path)
  manifest.verify_files(rows, manifest=m)
  os.unlink(rows[2]["path"])
  with pytest.raises(manifest.ManifestError) as e:
    manifest.verify_files(rows, manifest=m)
  msg = str(e.value)
  assert "\n" not in msg and is_user_error(e.value)
  assert f"{m}:3: {rows[2]['path']}: no such file" in msg and "1 of 4" in msg
  # Without the manifest's path: the row index.
  with pytest.raises(manifest.ManifestError, match=r"row 2: .*u2\.wav: no such file"):
    manifest.verify_files(rows)


def test_all_bad_rows_in_one_line(tmp_path):
  m, rows = _corpus(tmp_path, n_files=9)
  for r in rows[1:]:
    os.unlink(r["path"])
  with pytest.raises(manifest.ManifestError) as e:
    manifest.verify_files(rows, manifest=m)
  msg = str(e.value)
  assert "8 of 9 audio row(s)" in msg and "and 3 more" in msg and "\n" not in msg
  assert msg.count("no such file") == manifest.SHOWN_PROBLEMS


def test_truncated_wav_caught(tmp_path):
  """libsndfile reads a truncated WAV without complaint, just shorter: the RIFF size catches it,
  whether the manifest was built before the cut or after it."""
  m, rows = _corpus(tmp_path, channels=2)
  _truncate(rows[1]["path"])
  short = sf.info(rows[1]["path"]).frames
  assert 0 < short < rows[1]["n_samples"]  # what libsndfile says: fewer frames, no error
  rows[1]["n_samples"] = short  # as a manifest built from the truncated file would say
  with pytest.raises(manifest.ManifestError, match=rf"{m}:2: .*u1\.wav: truncated \(the header "
                     r"declares 12400 bytes of samples, the file holds \d+\)"):
    manifest.verify_files(rows, manifest=m)
  # ... and building a manifest from it fails the same way (it used to pass: issue 22, case 7).
  with pytest.raises(manifest.ManifestError, match=r"u1\.wav: truncated"):
    manifest.build_manifest(tmp_path / "wavs", "folder")


@pytest.mark.parametrize("fmt,subtype", [("AIFF", "PCM_16"), ("W64", "PCM_16"),
                                         ("RF64", "PCM_16"), ("FLAC", "PCM_16")])
def test_truncated_other_formats_caught(tmp_path, fmt, subtype):
  row = _wav(tmp_path / f"x.{fmt.lower()}", n=16000, fmt=fmt, subtype=subtype)
  manifest.verify_files([row])
  _truncate(row["path"])
  with pytest.raises(manifest.ManifestError, match=r"truncated"):
    manifest.verify_files([row])


def test_resampled_or_replaced_file_caught(tmp_path):
  m, rows = _corpus(tmp_path)
  _wav(rows[0]["path"], n=1500, sr=8000)  # resampled after the manifest was built
  _wav(rows[3]["path"], n=5000)  # replaced by a longer recording
  with pytest.raises(manifest.ManifestError) as e:
    manifest.verify_files(rows, manifest=m)
  msg = str(e.value)
  assert f"{m}:1: {rows[0]['path']}: the file's sample rate is 8000 Hz, the row says 16000" in msg
  assert f"{m}:4: {rows[3]['path']}: the file has 5000 samples" in msg and "n_samples=3300" in msg


def test_symlink_loop_folder_and_rows_without_path(tmp_path):
  loop = tmp_path / "loop.wav"
  os.symlink(loop, loop)
  broken = tmp_path / "broken.wav"
  os.symlink(tmp_path / "gone.wav", broken)
  rows = [{"path": str(loop), "n_samples": 1, "sample_rate": 16000},
          {"path": str(broken), "n_samples": 1, "sample_rate": 16000},
          {"path": str(tmp_path), "n_samples": 1, "sample_rate": 16000},
          {"id": "text0", "phones": "a b"}]  # no file: skipped
  with pytest.raises(manifest.ManifestError) as e:
    manifest.verify_files(rows)
  msg = str(e.value)
  assert "3 of 3" in msg and f"{loop}: symlink loop" in msg
  assert f"{broken}: broken symlink to {tmp_path / 'gone.wav'}" in msg
  assert f"{tmp_path}: a folder, not a file" in msg
  manifest.verify_files([{"id": "text0", "phones": "a b"}])


def test_cache_skips_unchanged_files_and_rechecks_changed_ones(tmp_path, monkeypatch):
  m, rows = _corpus(tmp_path)
  cache = str(tmp_path / "work" / "file_check.json")
  checked = []
  real = manifest.file_facts
  monkeypatch.setattr(manifest, "file_facts", lambda p: checked.append(p) or real(p))
  manifest.verify_files(rows, manifest=m, cache_path=cache)
  assert sorted(checked) == sorted(r["path"] for r in rows) and os.path.exists(cache)
  checked.clear()
  manifest.verify_files(rows, manifest=m, cache_path=cache)
  assert checked == []  # a re-run: one stat per file, nothing opened
  # Changed files are checked again: same size, new mtime; new size (truncated).
  st = os.stat(rows[0]["path"])
  os.utime(rows[0]["path"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _truncate(rows[2]["path"], keep=0.9)
  before = open(cache).read()
  with pytest.raises(manifest.ManifestError, match=r"1 of 4 .*m\.jsonl:3: .*u2\.wav: truncated"):
    manifest.verify_files(rows, manifest=m, cache_path=cache)
  assert sorted(checked) == sorted([rows[0]["path"], rows[2]["path"]])
  assert open(cache).read() == before  # a refused check leaves the cache (the workdir) as it was
  checked.clear()
  with pytest.raises(manifest.ManifestError, match=r"u2\.wav: truncated"):
    manifest.verify_files(rows, manifest=m, cache_path=cache)
  assert sorted(checked) == sorted([rows[0]["path"], rows[2]["path"]])
  manifest.verify_files(rows[:2], cache_path=cache)  # passes: now rows[0] is cached again
  checked.clear()
  manifest.verify_files(rows[:2], cache_path=cache)
  assert checked == []
  # A cache that is garbage is only a slower check.
  open(cache, "w").write("{not json")
  checked.clear()
  manifest.verify_files(rows[:2], cache_path=cache)
  assert len(checked) == 2


def test_pipeline_rejects_a_file_resampled_after_the_manifest(tmp_path):
  _, rows = _corpus(tmp_path, n_files=1)
  src = pipeline.ManifestSource(rows)
  assert src.load(0, 0, 4000).shape == (3000,) and src.load(0, 1000, 1000).shape == (1000,)
  _wav(rows[0]["path"], n=3000 * 22050 // 16000, sr=22050)
  for start, length in ((0, 4000), (1000, 1000)):  # whole file; a cropped window
    with pytest.raises(AudioError, match=r"u0\.wav: the file's sample rate is 22050 Hz, the "
                       r"manifest row says 16000 Hz"):
      src.load(0, start, length)
  _wav(rows[0]["path"], n=1000)  # same rate, shorter than the row says
  with pytest.raises(AudioError, match=r"u0\.wav: 1000 samples at 16 kHz, the manifest row says "
                     r"3000"):
    src.load(0, 0, 4000)
  with pytest.raises(AudioError, match=r"u0\.wav: empty audio window .* shorter than the "
                     r"manifest row says"):
    src.load(0, 2000, 500)


def _data_config(manifest_path="", cache_dir=""):
  return ml_collections.ConfigDict({"manifest": manifest_path, "split": "train",
                                    "cache_dir": cache_dir, "builtin_utterances": 8})


def test_verify_training_data_checks_the_rows_the_iterator_reads(tmp_path):
  from jaxspeech.methods.base import Method
  from jaxspeech.train import data

  m, rows = _corpus(tmp_path)
  lines = open(m).read().splitlines()
  # Row 2 is of another split: the iterator never reads it, so its missing file is no error.
  lines[1] = lines[1].replace('"speaker": "s"', '"speaker": "s", "split": "test"')
  open(m, "w").write("\n".join(lines).replace('"speaker": "s"}', '"speaker": "s", "split": '
                                              '"train"}') + "\n")
  config = ml_collections.ConfigDict({"data": _data_config(m)})
  workdir = tmp_path / "work"
  workdir.mkdir()
  os.unlink(rows[1]["path"])
  assert data.verify_training_data(config, None, str(workdir)) == 3
  assert os.path.exists(workdir / data.FILE_CHECK_CACHE)
  os.unlink(rows[3]["path"])
  with pytest.raises(manifest.ManifestError, match=rf"1 of 3 .*{m}:4: .*u3\.wav: no such file"):
    data.verify_training_data(config, None, str(workdir))

  class DefaultManifest(Method):  # config.data.manifest unset: the method's default corpus
    def default_manifest(self, data_config):
      return m

  config = ml_collections.ConfigDict({"data": _data_config()})
  with pytest.raises(manifest.ManifestError, match=rf"{m}:4: .*u3\.wav: no such file"):
    data.verify_training_data(config, DefaultManifest(config), None)

  class NotAudio(DefaultManifest):
    uses_audio = False

  assert data.verify_training_data(config, NotAudio(config), None) == 0


def test_missing_and_empty_manifest_one_line(tmp_path):
  from jaxspeech.methods.base import Method

  gone = tmp_path / "gone.jsonl"
  with pytest.raises(FileNotFoundError) as e:
    manifest.read_manifest(gone)
  assert one_line(e.value) == f"no such manifest file: {gone}"
  config = ml_collections.ConfigDict({"data": _data_config(str(gone))})
  with pytest.raises(FileNotFoundError, match=rf"config.data.manifest='{gone}': no such file"):
    Method(config).training_rows()
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(manifest.ManifestError, match=rf"{empty}: empty manifest \(no rows\)"):
    Method(ml_collections.ConfigDict({"data": _data_config(str(empty))})).training_rows()
  with pytest.raises(IsADirectoryError) as e:
    manifest.read_manifest(tmp_path)
  assert is_user_error(e.value) and str(tmp_path) in one_line(e.value)
