"""Loader throughput and speaker perturbation: Praat (CPU, per utterance) vs JAX (jit, batch).

    .venv/bin/python -m benchmarks.loader_throughput [--quick] [--out results.json]

1. Pipeline throughput in audio-seconds delivered per wall-second (real samples, padding not
   counted), on the LibriSpeech excerpt (FLAC 16 kHz, random 4/8 s crops) and FSDD (8 kHz WAV,
   resampled), perturbation off / Praat / JAX, with 0 (in-process), 1 and 2 Grain workers. The
   first batch (worker start-up, JAX compile) is excluded and reported separately.
2. Perturbation speed alone: Praat "Change gender" + IIR EQ one utterance at a time vs the
   jit-compiled JAX op on a batch (CPU here; the same function runs on an accelerator).
3. Speaker-change probe: a nearest-centroid speaker classifier on long-term log-spectrum
   statistics, fit on clean synthetic speech (8 speakers), scored on held-out utterances clean,
   Praat-perturbed and JAX-perturbed (lower accuracy = more speaker change). Frame counts of the
   views are checked equal (content alignment kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
SR = 16000


def throughput(rows, *, buckets, batch_size, perturb, workers, batches, seed=0):
  from data_pipelines import pipeline

  ds = pipeline.make_dataset(rows, batch_size=batch_size, bucket_lengths=buckets, seed=seed,
                             num_epochs=None, perturb=perturb, worker_count=workers)  # fmt: skip
  it = iter(ds)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  t0, secs = time.perf_counter(), 0.0
  for _ in range(batches):
    secs += next(it)["audio_mask"].sum() / SR
  wall = time.perf_counter() - t0
  del it
  return {"audio_s_per_s": round(secs / wall, 1), "audio_s": round(secs, 1),
          "wall_s": round(wall, 2), "first_batch_s": round(first, 2)}  # fmt: skip


def features(x):
  """Long-term log-spectrum mean and std in 40 bands: a speaker (voice + channel) fingerprint."""
  import scipy.signal

  _, _, z = scipy.signal.stft(x, SR, nperseg=512)
  logp = np.log(np.abs(z) ** 2 + 1e-10)  # [K, T]
  bands = np.array_split(logp, 40, axis=0)
  b = np.stack([v.mean(0) for v in bands])  # [40, T]
  voiced = b.mean(0) > np.percentile(b.mean(0), 30)
  return np.concatenate([b[:, voiced].mean(1), b[:, voiced].std(1)])


def probe(rows, *, crop_s=2.0, n_test=48):
  import jax

  from data_pipelines.perturb import praat_perturb
  from jaxspeech.audio import load_audio
  from jaxspeech.ops.perturb import perturb_batch

  n = int(crop_s * SR)
  xs = [load_audio(r["path"])[:n] for r in rows]
  keep = [i for i, x in enumerate(xs) if len(x) == n]
  spk = sorted({rows[i]["speaker"] for i in keep})
  y = np.array([spk.index(rows[i]["speaker"]) for i in keep])
  X = np.stack([xs[i] for i in keep])  # [N, S]
  test = np.zeros(len(keep), bool)  # stratified: the last n_test // speakers of each speaker
  for k in range(len(spk)):
    test[np.flatnonzero(y == k)[-(n_test // len(spk)) :]] = True
  n_test = int(test.sum())
  F = np.stack([features(x) for x in X])
  mu, sd = F[~test].mean(0), F[~test].std(0) + 1e-6
  cents = np.stack([((F[~test][y[~test] == k] - mu) / sd).mean(0) for k in range(len(spk))])

  def acc(Xv):
    f = (np.stack([features(x) for x in Xv]) - mu) / sd
    pred = np.argmin(((f[:, None] - cents[None]) ** 2).sum(-1), 1)
    return float((pred == y[test]).mean())

  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  praat_x = np.stack([praat_perturb(x, SR, rng) for x in X[test]])
  t_praat = time.perf_counter() - t0
  f = jax.jit(perturb_batch)
  mask = np.ones_like(X[test], bool)
  f(jax.random.key(0), X[test], mask).block_until_ready()  # compile
  t0 = time.perf_counter()
  jax_x = np.asarray(f(jax.random.key(1), X[test], mask))
  t_jax = time.perf_counter() - t0
  assert praat_x.shape == jax_x.shape == X[test].shape  # frame counts equal: content aligned
  audio_s = n_test * crop_s
  return {
    "speakers": len(spk), "test_utterances": n_test, "crop_s": crop_s,
    "speaker_id_accuracy": {"clean": acc(X[test]), "praat": acc(praat_x), "jax": acc(jax_x)},
    "chance": round(1 / len(spk), 3),
    "perturb_speed_audio_s_per_s": {"praat_serial": round(audio_s / t_praat, 1),
                                    "jax_cpu_batch": round(audio_s / t_jax, 1)},
    "perturb_wall_s": {"praat": round(t_praat, 2), "jax": round(t_jax, 2)},
  }  # fmt: skip


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true", help="fewer batches")
  ap.add_argument("--out")
  args = ap.parse_args()
  sys.path.insert(0, ROOT)
  from data_pipelines import synth
  from data_pipelines.manifest import build_manifest

  q = args.quick
  libri = build_manifest(os.path.join(SHARED, "librispeech-excerpt"), "librispeech")[0]
  fsdd = build_manifest(os.path.join(SHARED, "fsdd"), "fsdd")[0]
  res = {"cpu_count": os.cpu_count(), "throughput": {}}
  nb = 10 if q else 30
  for name, rows, buckets, bs in (("librispeech_4s_8s_crops", libri, (64000, 128000), 8),
                                  ("fsdd_8k", fsdd, (8000, 16000, 40000), 32)):  # fmt: skip
    for perturb, nbat in ((None, nb), ("praat", max(3, nb // 5)), ("jax", max(3, nb // 5))):
      for workers in (0, 1, 2):
        key = f"{name}/perturb={perturb}/workers={workers}"
        res["throughput"][key] = r = throughput(rows, buckets=buckets, batch_size=bs,
                                                perturb=perturb, workers=workers, batches=nbat)
        print(key, r, flush=True)
  with tempfile.TemporaryDirectory() as d:
    rows, _ = synth.load_corpus(synth.synthesize_corpus(os.path.join(d, "c"), 240, seed=11))
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    res["probe"] = probe(rows)
  print(json.dumps(res["probe"], indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
