import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import phones, pipeline, synth
from data_pipelines.manifest import build_manifest
from jaxspeech.audio import AudioError, load_audio
from tests.data_pipelines.conftest import shared

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def fsdd_rows():
  rows, _ = build_manifest(shared("fsdd"), "fsdd")
  rng = np.random.default_rng(0)
  return [rows[i] for i in sorted(rng.choice(len(rows), 60, replace=False))]


@pytest.fixture(scope="module")
def libri_rows():
  return build_manifest(shared("librispeech-excerpt"), "librispeech")[0][:24]


def norm(x):
  return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def collect(ds):
  return list(iter(ds))


def test_every_utterance_once_padded_and_resampled(fsdd_rows):
  buckets = (8000, 16000, 40000)  # FSDD is <= 2.3 s: nothing is cropped
  ds = pipeline.make_dataset(fsdd_rows, batch_size=8, bucket_lengths=buckets, seed=1,
                             drop_remainder=False)
  batches = collect(ds)
  idx = np.concatenate([b["index"][b["valid"]] for b in batches])
  assert sorted(idx.tolist()) == list(range(len(fsdd_rows)))
  spk = pipeline.speaker_index(fsdd_rows)
  for b in batches:
    length = b["audio"].shape[1]
    assert length in buckets and b["audio_mask"].shape == b["audio"].shape
    assert not b["audio"][~b["audio_mask"]].any()
    for j in np.flatnonzero(b["valid"]):
      row = fsdd_rows[b["index"][j]]
      ref = load_audio(row["path"])  # 8 kHz -> 16 kHz
      n = b["audio_mask"][j].sum()
      assert n == len(ref) == int(np.ceil(row["n_samples"] * 2))
      # the shortest bucket that holds it
      assert length == min(x for x in buckets if x >= n)
      np.testing.assert_allclose(b["audio"][j, :n], norm(ref), atol=1e-4)
      assert b["speaker_id"][j] == spk[row["speaker"]]
    assert (b["index"][~b["valid"]] == -1).all() and not b["audio_mask"][~b["valid"]].any()


def test_random_crop_matches_file(libri_rows):
  ds = pipeline.make_dataset(libri_rows, batch_size=4, bucket_lengths=(16000,), seed=0,
                             normalize=False)
  offsets = []
  for b in collect(ds)[:3]:
    assert b["audio_mask"].all()
    for j in range(4):
      ref = load_audio(libri_rows[b["index"][j]]["path"])
      o = b["offset"][j]
      offsets.append(o)
      np.testing.assert_allclose(b["audio"][j], ref[o : o + 16000], atol=1e-6)
  assert len(set(offsets)) > 1


def test_checkpoint_resume_and_determinism(fsdd_rows):
  kw = dict(batch_size=4, bucket_lengths=(8000, 16000, 40000), seed=5, num_epochs=None)
  it = iter(pipeline.make_dataset(fsdd_rows, **kw))
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(20)]  # crosses the epoch boundary (60 rows / 4 < 27)
  it2 = iter(pipeline.make_dataset(fsdd_rows, **kw))
  it2.set_state(state)
  got = [next(it2) for _ in range(20)]
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # epochs are reshuffled, and a different seed gives a different order
  per = pipeline.batches_per_epoch(fsdd_rows, batch_size=4, bucket_lengths=kw["bucket_lengths"])
  it3 = iter(pipeline.make_dataset(fsdd_rows, **kw))
  stream = [next(it3)["index"].tolist() for _ in range(2 * per)]
  assert stream[:per] != stream[per:]
  other = next(iter(pipeline.make_dataset(fsdd_rows, **(kw | {"seed": 6}))))
  assert other["index"].tolist() != stream[0]


def test_two_workers_equal_in_process(fsdd_rows):
  kw = dict(batch_size=4, bucket_lengths=(8000, 16000, 40000), seed=2)
  a = collect(pipeline.make_dataset(fsdd_rows, **kw))
  b = collect(pipeline.make_dataset(fsdd_rows, worker_count=2, **kw))
  assert len(a) == len(b) > 5
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_host_slices_make_the_global_batch(fsdd_rows):
  kw = dict(batch_size=8, bucket_lengths=(16000, 40000), seed=0)
  full = collect(pipeline.make_dataset(fsdd_rows, process_index=0, process_count=1, **kw))
  h0 = collect(pipeline.make_dataset(fsdd_rows, process_index=0, process_count=2, **kw))
  h1 = collect(pipeline.make_dataset(fsdd_rows, process_index=1, process_count=2, **kw))
  for f, a, b in zip(full, h0, h1):
    assert a["audio"].shape[0] == 4 and a["audio"].shape == b["audio"].shape
    for k in f:
      np.testing.assert_array_equal(f[k], np.concatenate([a[k], b[k]]))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_dataset(fsdd_rows, process_index=0, process_count=3, **kw)


def test_phone_labels_follow_the_crop(synth_corpus):
  rows, inv = synth.load_corpus(synth_corpus)
  p2i = {p: i for i, p in enumerate(inv)}
  ds = pipeline.make_dataset(rows, batch_size=4, bucket_lengths=(24000,), seed=0,
                             label_frame_rate=50, phone_to_id=p2i)
  b = next(iter(ds))
  assert b["phone_ids"].shape == (4, 24000 * 50 // 16000)
  for j in range(4):
    row = rows[b["index"][j]]
    want = phones.frame_labels(row["alignment"], 75, 50, p2i, offset_s=b["offset"][j] / 16000)
    np.testing.assert_array_equal(b["phone_ids"][j], want)
  assert (b["phone_ids"] >= 0).mean() > 0.95


def test_praat_perturbation_in_workers(synth_corpus):
  pytest.importorskip("parselmouth")
  rows, _ = synth.load_corpus(synth_corpus)
  kw = dict(batch_size=4, bucket_lengths=(32000,), seed=0, perturb="praat", num_epochs=1)
  a = collect(pipeline.make_dataset(rows[:16], **kw))
  b = collect(pipeline.make_dataset(rows[:16], worker_count=2, **kw))
  assert len(a) == len(b) == 4
  for x, y in zip(a, b):
    # Same utterances and crops; Praat's PSOLA places unvoiced pulses at random (its own RNG),
    # so the perturbed view itself is not bit-reproducible.
    np.testing.assert_array_equal(x["audio"], y["audio"])
    p, m = y["audio_perturbed"], y["audio_mask"]
    assert p.shape == x["audio"].shape and not p[~m].any()
    for j in range(4):
      c = np.corrcoef(p[j][m[j]], x["audio"][j][m[j]])[0, 1]
      assert c < 0.9  # a different signal, not a copy


def test_jax_perturbation_mode(synth_corpus):
  rows, _ = synth.load_corpus(synth_corpus)
  b = next(iter(pipeline.make_dataset(rows[:8], batch_size=4, bucket_lengths=(32000,),
                                      seed=0, perturb="jax")))
  p, m = b["audio_perturbed"], b["audio_mask"]
  assert p.shape == (4, 32000) and np.isfinite(p).all() and not p[~m].any()
  np.testing.assert_allclose(p[m.all(1)].mean(1), 0, atol=1e-3)


def test_missing_and_nan_files_named(tmp_path, fsdd_rows):
  bad = dict(fsdd_rows[0], path=str(tmp_path / "gone.wav"))
  ds = pipeline.make_dataset([bad] + fsdd_rows[1:4], batch_size=4, bucket_lengths=(40000,),
                             shuffle=False)
  with pytest.raises(AudioError, match="gone.wav: no such file"):
    collect(ds)


def test_tfds_data_source(tmp_path, fsdd_rows):
  pytest.importorskip("tensorflow_datasets")
  from data_pipelines import tfds_source

  rows = [dict(r, split="train") for r in fsdd_rows[:20]]
  tfds_source.write_tfds(rows, name="tiny_speech", data_dir=tmp_path)
  src = tfds_source.open_tfds("tiny_speech", data_dir=tmp_path, split="train")
  assert len(src) == 20
  batches = collect(pipeline.make_dataset(src, batch_size=4, bucket_lengths=(40000,), seed=0,
                                          drop_remainder=False))
  by_id = {r["id"]: r for r in rows}
  seen = 0
  for b in batches:
    for j in np.flatnonzero(b["valid"]):
      rec = src.ds[int(b["index"][j])]
      row = by_id[rec["id"].decode() if isinstance(rec["id"], bytes) else rec["id"]]
      ref = load_audio(row["path"])
      n = b["audio_mask"][j].sum()
      assert n == len(ref)
      np.testing.assert_allclose(b["audio"][j, :n], norm(ref), atol=2e-3)  # int16 storage
      seen += 1
  assert seen == 20


_GLOBAL = r"""
import os, sys, numpy as np, jax
sys.path.insert(0, {root!r})
from jax.sharding import Mesh, AxisType
from data_pipelines import pipeline
from data_pipelines.manifest import build_manifest
rows = build_manifest({fsdd!r}, "fsdd")[0][:64]
n = len(jax.devices())
mesh = Mesh(np.array(jax.devices()).reshape(n, 1), ("data", "model"),
            axis_types=(AxisType.Auto, AxisType.Auto))
b = next(iter(pipeline.make_dataset(rows, batch_size=8, bucket_lengths=(40000,), seed=0)))
g = pipeline.to_global(b, mesh, "data")
assert g["audio"].shape == (8, 40000) and len(g["audio"].addressable_shards) == n
assert g["audio"].sharding.spec[0] == "data"
for k in b:
  np.testing.assert_array_equal(np.asarray(g[k]), b[k])
print("OK", n, g["audio"].addressable_shards[0].data.shape)
"""


@pytest.mark.parametrize("devices", [1, 8])
def test_to_global_on_a_mesh(devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  code = _GLOBAL.format(root=ROOT, fsdd=shared("fsdd"))
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split()[:2] == ["OK", str(devices)]
  assert f"({8 // devices}, 40000)" in r.stdout
