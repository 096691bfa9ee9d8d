"""The Grain input pipeline: manifest rows (or a TFDS data source) -> padded 16 kHz batches.

    ds = make_dataset(rows, batch_size=8, bucket_lengths=(32_000, 64_000), seed=0)
    it = iter(ds)                     # grain DatasetIterator: it.get_state() / it.set_state(s)
    batch = next(it)                  # dict of numpy arrays (this host's rows of a global batch)
    arrays = to_global(batch, mesh, "data")   # dict of global jax.Arrays sharded over "data"

Per utterance: pick a bucket (the shortest bucket length >= the utterance, else the longest) ->
random crop window of at most that length -> decode just that window (soundfile) -> resample to
16 kHz (`scipy.signal.resample_poly`) -> optional speaker perturbation of the window (Praat +
EQ in the worker, or the JAX op on the worker's CPU) -> normalise (zero mean, unit variance over
real samples) -> pad to the bucket length with a mask.

Batches are formed within a bucket, so every batch has one static length from `bucket_lengths`
(jit compiles once per bucket). A global batch plan (which utterances, which bucket, in which
order) is a pure function of (seed, epoch); each host loads only its slice of every global batch
(`batch_size` is the global batch, split over `jax.process_count()` hosts), so all hosts agree
on the bucket of every step. Randomness (crop offsets, perturbation) is a pure function of
(seed, global batch index, row), so results do not depend on the number of workers, and the
iterator state (a position) restores the exact stream: Orbax saves it with
`grain.checkpoint.CheckpointSave(iterator)`.

Batch fields (B = batch_size // process_count, L = bucket length in samples):
  audio            float32 [B, L]   normalised waveform (`normalize`), 0 in padding
  audio_mask       bool    [B, L]   True = real sample
  audio_perturbed  float32 [B, L]   (perturb="praat"/"jax") the speaker-perturbed view, same mask
  speaker_id       int32   [B]      index into `speaker_index(rows)` (or the given mapping)
  index            int32   [B]      row index in the source; -1 for filler rows
  valid            bool    [B]      False for filler rows (drop_remainder=False only)
  offset           int32   [B]      crop start in 16 kHz samples
  phone_ids        int32   [B, F]   (label_frame_rate set) frame phone ids, -1 = none / padding;
                                    F = L * label_frame_rate // 16000
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence

import grain
import numpy as np
import soundfile as sf

from data_pipelines import phones as phones_lib
from jaxspeech.audio import (
  SAMPLE_RATE,
  AudioError,
  load_audio,
  missing_reason,
  normalization,
  resample,
  scale_waveform,
)

PERTURB_MODES = (None, "praat", "jax")


# ---------------------------------------------------------------------------------------------
# Sources: random access to utterances, with 16 kHz lengths known up front (for bucketing).


class ManifestSource:
  """Utterances of manifest rows (absolute paths, as `read_manifest` returns them)."""

  def __init__(self, rows: Sequence[dict]):
    if not rows:
      raise ValueError("no manifest rows")
    self.rows = list(rows)
    self.lengths = np.asarray(
      [math.ceil(r["n_samples"] * SAMPLE_RATE / r["sample_rate"]) for r in self.rows], np.int64
    )  # [N] at 16 kHz
    self.speakers = [str(r["speaker"]) for r in self.rows]

  def __len__(self) -> int:
    return len(self.rows)

  def alignment(self, i: int):
    return self.rows[i].get("alignment")

  def load(self, i: int, start: int, length: int) -> np.ndarray:
    """16 kHz float32 samples [start, start + length) of utterance i (fewer at the end). [<=L]"""
    row = self.rows[i]
    path, sr = row["path"], int(row["sample_rate"])
    if start == 0 and length >= self.lengths[i]:
      # Whole file: load_audio checks everything; the rate must be the row's (a file resampled
      # after the manifest was built would otherwise be read at its new rate, with the old
      # length's bucket), and so must the length.
      wav = load_audio(path, SAMPLE_RATE, expect_sr=sr)
      if wav.shape[0] != self.lengths[i]:
        raise AudioError(f"{path}: {wav.shape[0]} samples at 16 kHz, the manifest row says "
                         f"{self.lengths[i]} (n_samples={row['n_samples']} at {sr} Hz); the "
                         "file changed after the manifest was built: rebuild it")
      return wav
    # Read only the window (plus a margin so the resampling filter sees real neighbours): long
    # files cropped to short buckets would otherwise be decoded and resampled in full.
    period = sr // math.gcd(sr, SAMPLE_RATE)  # native samples that map to whole 16 kHz samples
    margin = period * math.ceil(64 / period) if sr != SAMPLE_RATE else 0
    n0 = start * sr // SAMPLE_RATE
    n0 -= n0 % period  # align the window to the polyphase period (exact output positions)
    lo = max(0, n0 - margin)
    frames = (length * sr // SAMPLE_RATE) + 2 * margin + 2 * period
    if (why := missing_reason(path)) is not None:
      raise AudioError(f"{path}: {why}")
    try:
      wav, file_sr = sf.read(path, start=lo, frames=frames + (n0 - lo), dtype="float32",
                             always_2d=True)
    except Exception as e:
      raise AudioError(f"{path}: unreadable audio ({e})") from e
    if file_sr != sr:
      raise AudioError(f"{path}: the file's sample rate is {file_sr} Hz, the manifest row says "
                       f"{sr} Hz (the file changed after the manifest was built; rebuild it)")
    if wav.shape[0] == 0:
      raise AudioError(f"{path}: empty audio window at sample {lo}: the file is shorter than "
                       f"the manifest row says (n_samples={row['n_samples']}); rebuild it")
    if not np.all(np.isfinite(wav)):
      raise AudioError(f"{path}: audio contains NaN or inf")
    wav = wav.mean(axis=1)  # [S] mono
    out = resample(wav, sr, SAMPLE_RATE)
    skip = (n0 - lo) * SAMPLE_RATE // sr + (start - n0 * SAMPLE_RATE // sr)
    return np.ascontiguousarray(out[skip : skip + length], np.float32)


class RowSource:
  """Rows that are not audio (text, images, labels, pairs...): every row is one item; nothing is
  decoded here -- the method's `row_fields` map turns a row into arrays."""

  def __init__(self, rows: Sequence[dict]):
    if not rows:
      raise ValueError("no manifest rows")
    self.rows = list(rows)
    self.lengths = np.zeros(len(self.rows), np.int64)
    self.speakers = [str(r.get("speaker", "")) for r in self.rows]

  def __len__(self) -> int:
    return len(self.rows)

  def alignment(self, i: int):
    return None


class TfdsSource:
  """Utterances of a `tfds.data_source(...)` (or any random-access sequence of dict records).

  The record's `audio_key` must decode to a 1-D integer or float array (int16 is scaled by
  1/32768). Lengths are read with one pass over the records unless given.
  """

  def __init__(
    self, data_source, *, audio_key: str = "audio", speaker_key: str = "speaker_id",
    sample_rate: int | None = None, sample_rate_key: str | None = "sample_rate",
    alignment_key: str | None = None, lengths: Sequence[int] | None = None,
  ):  # fmt: skip
    self.ds, self.audio_key, self.speaker_key = data_source, audio_key, speaker_key
    self.sample_rate, self.sample_rate_key = sample_rate, sample_rate_key
    self.alignment_key = alignment_key
    speakers, lens = [], []
    for i in range(len(data_source)):
      rec = data_source[i]
      speakers.append(_as_str(rec[speaker_key]))
      if lengths is None:
        lens.append(math.ceil(len(rec[audio_key]) * SAMPLE_RATE / self._rate(rec)))
    self.speakers = speakers
    self.lengths = np.asarray(lengths if lengths is not None else lens, np.int64)

  def __len__(self) -> int:
    return len(self.ds)

  def __getstate__(self):
    return self.__dict__  # tfds data sources pickle (they reopen their files in the worker)

  def _rate(self, rec) -> int:
    if self.sample_rate_key and self.sample_rate_key in rec:
      return int(rec[self.sample_rate_key])
    if self.sample_rate is None:
      raise ValueError(f"record has no {self.sample_rate_key!r}; pass sample_rate=")
    return self.sample_rate

  def alignment(self, i: int):
    return None

  def load(self, i: int, start: int, length: int) -> np.ndarray:
    rec = self.ds[i]
    a = np.asarray(rec[self.audio_key])
    wav = a.astype(np.float32) / 32768 if a.dtype == np.int16 else a.astype(np.float32)
    if wav.size == 0 or not np.all(np.isfinite(wav)):
      raise AudioError(f"TFDS record {i}: empty or non-finite audio")
    wav = resample(wav.reshape(-1), self._rate(rec), SAMPLE_RATE)
    return np.ascontiguousarray(wav[start : start + length])


def _as_str(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v.item() if hasattr(v, "item") else v)


def speaker_index(speakers: Sequence[str] | Sequence[dict]) -> dict[str, int]:
  """Sorted speaker labels -> ids 0..n-1 (from labels or manifest rows)."""
  labels = {str(s["speaker"]) if isinstance(s, dict) else str(s) for s in speakers}
  return {s: i for i, s in enumerate(sorted(labels))}


def bucket_of(lengths: np.ndarray, bucket_lengths: Sequence[int]) -> np.ndarray:
  """Bucket index of each length: the shortest bucket holding it, else the longest. [N]."""
  b = np.asarray(sorted(bucket_lengths))
  return np.minimum(np.searchsorted(b, lengths, side="left"), len(b) - 1)


# ---------------------------------------------------------------------------------------------
# The global batch plan and the per-batch loader (module-level classes: workers unpickle them).


class _BatchPlan:
  """Global batch g -> (bucket, row indices with -1 fillers). Pure function of (seed, epoch)."""

  def __init__(self, buckets, num_buckets, batch_size, seed, shuffle, drop_remainder):
    self.buckets, self.num_buckets = np.asarray(buckets), num_buckets
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.drop_remainder = drop_remainder
    self.per_epoch = len(self._epoch_plan(0))
    if self.per_epoch == 0:
      raise ValueError(
        f"no full batch of {batch_size} in any bucket (bucket sizes "
        f"{np.bincount(self.buckets, minlength=num_buckets).tolist()}); lower batch_size or "
        "use drop_remainder=False"
      )

  @functools.lru_cache(maxsize=2)  # noqa: B019 (instances live as long as the dataset)
  def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch, 0x9E37])
    plan = []
    for b in range(self.num_buckets):
      idx = np.flatnonzero(self.buckets == b)
      if self.shuffle:
        idx = rng.permutation(idx)
      n_full = len(idx) // self.batch_size
      for j in range(n_full):
        plan.append((b, idx[j * self.batch_size : (j + 1) * self.batch_size]))
      rest = idx[n_full * self.batch_size :]
      if len(rest) and not self.drop_remainder:
        plan.append((b, np.concatenate([rest, np.full(self.batch_size - len(rest), -1)])))
    if self.shuffle:
      plan = [plan[k] for k in rng.permutation(len(plan))]
    return plan

  def __call__(self, g: int) -> tuple[int, int, np.ndarray]:
    bucket, rows = self._epoch_plan(g // self.per_epoch)[g % self.per_epoch]
    return g, bucket, rows


class _LoadBatch:
  """Loads this host's rows of a global batch into padded numpy arrays."""

  def __init__(self, source, bucket_lengths, speaker_to_id, *, seed, host_slice, normalize,
               perturb, label_frame_rate, phone_to_id, row_fields=None,
               row_spec=None):  # fmt: skip
    self.source, self.bucket_lengths = source, tuple(sorted(bucket_lengths))
    self.speaker_to_id, self.seed, self.host_slice = speaker_to_id, seed, host_slice
    self.normalize, self.perturb = normalization(normalize), perturb
    self.label_frame_rate, self.phone_to_id = label_frame_rate, phone_to_id
    self.row_fields, self.row_spec = row_fields, row_spec or {}

  def __call__(self, plan_entry) -> dict[str, np.ndarray]:
    g, bucket, rows = plan_entry
    rows = rows[self.host_slice]
    if isinstance(self.source, RowSource):
      out = {"index": np.asarray(rows, np.int32), "valid": np.asarray(rows) >= 0}
      return {**out, **self._row_fields(rows)}
    out = self._audio(g, bucket, rows)
    return {**out, **self._row_fields(rows)}

  def _row_fields(self, rows) -> dict[str, np.ndarray]:
    """The method's per-row arrays, stacked `[B, ...]`; zeros for filler rows. Each row's arrays
    are checked against `row_spec` (name -> (shape, dtype)): a mismatch names the row."""
    if self.row_fields is None:
      return {}
    out = {k: np.zeros((len(rows), *shape), dtype) for k, (shape, dtype) in self.row_spec.items()}
    for j, i in enumerate(rows):
      if i < 0:
        continue
      row = self.source.rows[int(i)]
      got = self.row_fields(row)
      where = row.get("path") or row.get("id") or f"row {int(i)}"
      if set(got) != set(out):
        raise ValueError(f"{where}: host_fields gave {sorted(got)}, the batch spec declares "
                         f"{sorted(out)}")
      for k, v in got.items():
        v = np.asarray(v)
        if v.shape != out[k].shape[1:]:
          raise ValueError(f"{where}: host field {k!r} has shape {v.shape}, declared "
                           f"{out[k].shape[1:]}")
        if not np.can_cast(v.dtype, out[k].dtype, casting="same_kind"):
          raise ValueError(f"{where}: host field {k!r} has dtype {v.dtype}, declared "
                           f"{out[k].dtype}")
        out[k][j] = v
    return out

  def _audio(self, g, bucket, rows) -> dict[str, np.ndarray]:
    length = self.bucket_lengths[bucket]
    b = len(rows)
    audio = np.zeros((b, length), np.float32)  # [B, L]
    mask = np.zeros((b, length), bool)  # [B, L]
    pert = np.zeros((b, length), np.float32) if self.perturb else None
    spk = np.zeros((b,), np.int32)
    offset = np.zeros((b,), np.int32)
    labels = None
    if self.label_frame_rate:
      n_frames = int(length * self.label_frame_rate // SAMPLE_RATE)
      labels = np.full((b, n_frames), -1, np.int32)  # [B, F]
    for j, i in enumerate(rows):
      if i < 0:
        continue
      rng = np.random.default_rng([self.seed, g, int(i)])
      n = int(self.source.lengths[i])
      start = int(rng.integers(0, n - length + 1)) if n > length else 0
      wav = self.source.load(int(i), start, length)  # [<=L]
      m = wav.shape[0]
      audio[j, :m], mask[j, :m] = self._norm(wav), True
      spk[j], offset[j] = self.speaker_to_id[self.source.speakers[i]], start
      if self.perturb == "praat":
        from data_pipelines.perturb import praat_perturb  # parselmouth only when used

        pert[j, :m] = self._norm(praat_perturb(wav, SAMPLE_RATE, rng))
      elif self.perturb == "jax":
        pert[j, :m] = wav  # raw window; perturbed for the whole batch below
      if labels is not None and self.source.alignment(i):
        lab = phones_lib.frame_labels(
          self.source.alignment(i), labels.shape[1], self.label_frame_rate, self.phone_to_id,
          offset_s=start / SAMPLE_RATE,
        )  # fmt: skip
        n_real = int(m * self.label_frame_rate // SAMPLE_RATE)
        labels[j, :n_real] = lab[:n_real]
    if self.perturb == "jax":
      pert = self._jax_perturb(g, pert, mask)
    out = {"audio": audio, "audio_mask": mask, "speaker_id": spk,
           "index": np.asarray(rows, np.int32), "valid": np.asarray(rows) >= 0,
           "offset": offset}  # fmt: skip
    if pert is not None:
      out["audio_perturbed"] = pert
    if labels is not None:
      out["phone_ids"] = labels
    return out

  def _norm(self, wav: np.ndarray) -> np.ndarray:
    return scale_waveform(wav, self.normalize)

  def _jax_perturb(self, g, raw, mask):
    import jax  # the worker's CPU; on an accelerator call jaxspeech.ops.perturb in the step

    from jaxspeech.ops.perturb import perturb_batch

    with jax.default_device(jax.devices("cpu")[0]):
      key = jax.random.fold_in(jax.random.key(self.seed), g)
      y = np.asarray(perturb_batch(key, raw, mask))  # [B, L]
    if self.normalize == "peak":
      y = np.where(mask, y, 0.0)
      y = 0.95 * y / np.maximum(np.abs(y).max(1, keepdims=True), 1e-8)
    elif self.normalize == "standard":
      n = np.maximum(mask.sum(1, keepdims=True), 1)  # [B, 1]
      mean = (y * mask).sum(1, keepdims=True) / n
      var = (((y - mean) * mask) ** 2).sum(1, keepdims=True) / n
      y = np.where(mask, (y - mean) / np.sqrt(var + 1e-7), 0.0)
    return y.astype(np.float32)


def _global_index(g: int, _) -> int:
  return g


def _ensure_absl_flags() -> None:
  """Grain's worker processes read absl flags; parse defaults when the caller has not."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS(sys.argv[:1], known_only=True)


def make_dataset(
  source: Sequence[dict] | ManifestSource | TfdsSource,
  *,
  batch_size: int,
  bucket_lengths: Sequence[int],
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = 1,
  perturb: str | None = None,
  worker_count: int = 0,
  worker_buffer_size: int = 2,
  normalize: bool | str = True,
  drop_remainder: bool = True,
  speaker_to_id: dict[str, int] | None = None,
  label_frame_rate: float | None = None,
  phone_to_id: dict[str, int] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  row_fields=None,
  row_spec: dict | None = None,
) -> grain.IterDataset:
  """A Grain dataset of host batches (see the module docstring for the fields).

  Args:
    source: manifest rows (`read_manifest`), a `ManifestSource` or a `TfdsSource`.
    batch_size: the *global* batch size; each host gets batch_size // process_count rows.
    bucket_lengths: allowed lengths in 16 kHz samples; longer utterances are randomly cropped to
      the longest bucket, shorter ones padded to the shortest bucket that holds them.
    seed: seeds the batch plan, crops and perturbation.
    shuffle: shuffle utterances within buckets and batches across buckets, per epoch.
    num_epochs: passes over the data; None repeats forever.
    normalize: per-utterance waveform scaling: True / "standard" zero mean, unit variance (HF
      Wav2Vec2FeatureExtractor; the SSL methods), "peak" peak at 0.95 (HiFi-GAN's
      `normalize(audio) * 0.95`; synthesis), False / "none" as read.
    perturb: None, "praat" (parselmouth + IIR EQ per utterance in the workers) or "jax" (the
      jit-compiled `jaxspeech.ops.perturb` on the worker's CPU, whole batch at once).
    worker_count: Grain worker processes (0 = in the calling process). With workers the
      calling script needs an `if __name__ == "__main__":` guard (workers are spawned).
    drop_remainder: drop each bucket's last partial batch per epoch; False fills it with
      `valid=False` rows instead (for evaluation: every utterance appears exactly once).
    speaker_to_id: speaker label -> id (default: `speaker_index` of the source).
    label_frame_rate: add `phone_ids` at this many frames per second (50 = 20 ms, 100 = 10 ms).
    phone_to_id: phone -> id for `phone_ids` (e.g. from the corpus's phones.txt).
    process_index, process_count: this host's slice (default: jax.process_index/count()).
    row_fields: a picklable map `row -> {field: array}` run on every row of a batch (a method's
      `host_fields`: labels, phone ids, images...); `row_spec` gives each field's
      (shape, dtype) per row, checked on every row. Filler rows get zeros.
  A `RowSource` (rows that are not audio) gives batches of `index`, `valid` and the row fields
  only.
  """
  if perturb not in PERTURB_MODES:
    raise ValueError(f"perturb must be one of {PERTURB_MODES}, got {perturb!r}")
  if not bucket_lengths or min(bucket_lengths) <= 0:
    raise ValueError(f"bucket_lengths must be positive sample counts, got {bucket_lengths}")
  if label_frame_rate and phone_to_id is None:
    raise ValueError("label_frame_rate needs phone_to_id")
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  src = source if isinstance(source, ManifestSource | TfdsSource | RowSource) else (
    ManifestSource(source))
  if row_fields is not None and not hasattr(src, "rows"):
    raise ValueError("row_fields needs manifest rows (a ManifestSource or RowSource)")
  speaker_to_id = speaker_to_id or speaker_index(src.speakers)
  unknown = sorted(set(src.speakers) - set(speaker_to_id))
  if unknown:
    raise ValueError(f"speakers missing from speaker_to_id: {unknown[:5]}")
  buckets = bucket_of(src.lengths, bucket_lengths)
  plan = _BatchPlan(buckets, len(bucket_lengths), batch_size, seed, shuffle, drop_remainder)
  local = batch_size // process_count
  loader = _LoadBatch(
    src, bucket_lengths, speaker_to_id, seed=seed,
    host_slice=slice(process_index * local, (process_index + 1) * local),
    normalize=normalize, perturb=perturb, label_frame_rate=label_frame_rate,
    phone_to_id=phone_to_id, row_fields=row_fields, row_spec=row_spec,
  )  # fmt: skip
  ds = grain.MapDataset.range(plan.per_epoch).repeat(num_epochs)
  ds = ds.map_with_index(_global_index).map(plan).map(loader)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if worker_count > 0:
    _ensure_absl_flags()
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=worker_count,
                                   per_worker_buffer_size=worker_buffer_size)
    )  # fmt: skip
  return it_ds


def batches_per_epoch(source, *, batch_size, bucket_lengths, seed=0, shuffle=True,
                      drop_remainder=True) -> int:  # fmt: skip
  """Number of global batches in one epoch of `make_dataset` with these settings."""
  src = source if isinstance(source, ManifestSource | TfdsSource | RowSource) else (
    ManifestSource(source))
  buckets = bucket_of(src.lengths, bucket_lengths)
  return _BatchPlan(buckets, len(bucket_lengths), batch_size, seed, shuffle,
                    drop_remainder).per_epoch  # fmt: skip


def to_global(batch: dict[str, np.ndarray], mesh, batch_axis: str | Sequence[str] = "data"):
  """Host batch -> global jax.Arrays sharded along `batch_axis` of `mesh` (dim 0).

  Every host passes its own rows (from `make_dataset`); the global batch is their
  concatenation in process order. Works for 1 device, many local devices and multi-host.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  axis = batch_axis if isinstance(batch_axis, str) else tuple(batch_axis)
  out = {}
  for k, v in batch.items():
    spec = PartitionSpec(axis, *([None] * (np.ndim(v) - 1)))
    out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), np.asarray(v))
  return out
