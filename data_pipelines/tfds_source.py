"""TFDS without TensorFlow: build a TFDS dataset from a manifest, read one through Grain.

Users who have `librispeech` / `spoken_digit` prepared in TFDS's `array_record` format read it
with `open_tfds(name, data_dir)` -> `TfdsSource` -> `pipeline.make_dataset`. `tfds.features.Audio`
decoding needs TensorFlow (../shared/STACK.md), so the builder here stores audio as an int16
`Tensor` plus a `sample_rate` field; `open_tfds` reads either layout when it decodes to numpy.

    write_tfds(rows, name="my_speech", data_dir=D)        # a manifest -> TFDS array_record
    src = open_tfds("my_speech", data_dir=D, split="train")
    ds = make_dataset(src, batch_size=8, bucket_lengths=(32000,))
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from data_pipelines.pipeline import TfdsSource
from jaxspeech.audio import load_audio


def write_tfds(
  rows: Sequence[dict], *, name: str, data_dir: str | os.PathLike, version: str = "1.0.0"
) -> str:
  """Writes manifest rows as a TFDS dataset (array_record) with one split per `split` value
  (rows without one go to "train"). Audio is stored as int16 at the file's own rate.
  Returns the builder's data directory."""
  import tensorflow_datasets as tfds

  splits: dict[str, list[dict]] = {}
  for r in rows:
    splits.setdefault(r.get("split", "train"), []).append(r)

  class _Builder(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version(version)
    # TFDS looks for a checksums file beside the builder's module; for a builder inside a
    # package that probe imports `importlib_resources`, which this stack lacks. A builder with
    # nothing to download needs no checksums: no code path.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
          "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
          "sample_rate": tfds.features.Scalar(dtype=np.int32),
          "speaker_id": tfds.features.Text(),
          "text": tfds.features.Text(),
          "id": tfds.features.Text(),
        }),
      )  # fmt: skip

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(rs) for s, rs in splits.items()}

    def _generate_examples(self, split_rows):
      for k, r in enumerate(split_rows):
        wav = load_audio(r["path"], target_sr=None)  # AudioError names a bad file
        pcm = np.clip(np.round(wav * 32768), -32768, 32767).astype(np.int16)
        uid = str(r.get("id", k))
        yield uid, {
          "audio": pcm, "sample_rate": int(r["sample_rate"]), "speaker_id": str(r["speaker"]),
          "text": r.get("text", ""), "id": uid,
        }  # fmt: skip

  _Builder.name = name
  builder = _Builder(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


def open_tfds(
  name: str, *, data_dir: str | os.PathLike | None = None, split: str = "train",
  audio_key: str = "audio", speaker_key: str = "speaker_id", sample_rate: int | None = None,
) -> TfdsSource:  # fmt: skip
  """`tfds.data_source(name, split=...)` wrapped for `make_dataset`."""
  import tensorflow_datasets as tfds

  ds = tfds.data_source(name, split=split, data_dir=None if data_dir is None else str(data_dir))
  return TfdsSource(ds, audio_key=audio_key, speaker_key=speaker_key, sample_rate=sample_rate)
