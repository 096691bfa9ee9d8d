"""Reference ABX scores from fastabx on fixed item sets, for tests/parity/test_abx_fastabx.py.

fastabx (the ZeroSpeech 2021 / libri-light ABX, re-implemented) needs Python >= 3.12 and a torch
build, which the project's 3.11 stack does not carry, so this script runs once in its own
interpreter and commits its inputs and outputs:

    python3.12 -m venv /tmp/fabx && /tmp/fabx/bin/pip install fastabx==0.9.0
    /tmp/fabx/bin/python scripts/abx_fastabx_reference.py --out tests/parity/data

It writes ``abx_items.npz`` (every item set: concatenated frames, per-item lengths, labels) and
``abx_fastabx.json`` (fastabx's within- and across-speaker error rates, in percent, without item
subsampling, angular distance, DTW alignment, levels ``[("next-phone", "prev-phone"), "speaker"]``
as ``fastabx.zerospeech_abx`` collapses them). It imports nothing from jaxspeech.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def item_sets(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """Three fixed item sets: continuous features with phone/speaker structure, one-hot discrete units
  (angular distances 0 or 1/2 only: many tied DTW paths) and a weak-signal set near chance."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, n_items, dim, signal in (("continuous", 240, 6, 1.0), ("units", 240, 8, None),
                                     ("weak", 240, 6, 0.25)):
    phones = rng.integers(0, 4, n_items)
    contexts = rng.integers(0, 3, n_items)  # index into (prev, next) pairs
    speakers = rng.integers(0, 4, n_items)
    lengths = rng.integers(2, 9, n_items)
    means = rng.normal(size=(4, dim))
    spk = rng.normal(size=(4, dim)) * 0.5
    frames = []
    for p, s, n in zip(phones, speakers, lengths):
      if signal is None:  # noisy unit sequence: the phone's code with prob. 0.6, else a random code
        codes = np.where(rng.random(n) < 0.6, p + 4 * (s % 2), rng.integers(0, dim, n))
        frames.append(np.eye(dim, dtype=np.float32)[codes])
      else:
        frames.append((signal * means[p] + spk[s] + rng.normal(size=(n, dim))).astype(np.float32))
    prev_next = np.array([[0, 1], [2, 3], [1, 0]])[contexts] + 10
    out[name] = {"frames": np.concatenate(frames), "lengths": lengths.astype(np.int64),
                 "phone": phones.astype(np.int64), "prev": prev_next[:, 0].astype(np.int64),
                 "next": prev_next[:, 1].astype(np.int64), "speaker": speakers.astype(np.int64)}
  return out


def fastabx_scores(items: dict[str, np.ndarray]) -> dict[str, float]:
  import polars as pl
  import torch
  from fastabx import Dataset, Score, Task
  from fastabx.accessor import InMemoryAccessor
  from fastabx.distance import abx_on_cell

  starts = np.concatenate([[0], np.cumsum(items["lengths"])[:-1]])
  indices = {i: (int(s), int(s + n)) for i, (s, n) in enumerate(zip(starts, items["lengths"]))}
  labels = pl.DataFrame({"#phone": items["phone"], "prev-phone": items["prev"],
                         "next-phone": items["next"], "speaker": items["speaker"]})
  scores = {}
  for mode, by, across in (("within", ["prev-phone", "next-phone", "speaker"], None),
                           ("across", ["prev-phone", "next-phone"], ["speaker"])):
    accessor = InMemoryAccessor(indices, torch.from_numpy(items["frames"]), torch.device("cpu"))
    task = Task(Dataset(labels=labels, accessor=accessor), on="#phone", by=by, across=across)
    score = Score(task, "angular", progress=False)
    levels = [("next-phone", "prev-phone"), "speaker"]
    scores[f"abx_{mode}"] = 100.0 * score.collapse(levels=levels)
    scores[f"num_{mode}_cells"] = int(score.cells["score"].is_not_nan().sum())
    # The same cells scored one by one by `abx_on_cell` (libri-light's symmetric d(A, X): the
    # earlier item's frames are the DTW rows). 0.9.0's grouped `Score` engine instead always puts
    # X's frames on the rows, which breaks a tie differently on a few discrete-unit cells.
    per_cell = [float(abx_on_cell(task[i], "angular")) for i in range(len(task))]
    score._cells = score.cells.with_columns(score=pl.Series(per_cell, dtype=pl.Float32))
    scores[f"abx_{mode}_per_cell"] = 100.0 * score.collapse(levels=levels)
  return scores


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/parity/data")
  args = parser.parse_args()
  import fastabx

  os.makedirs(args.out, exist_ok=True)
  sets = item_sets()
  np.savez_compressed(os.path.join(args.out, "abx_items.npz"),
                      **{f"{name}/{k}": v for name, d in sets.items() for k, v in d.items()})
  result = {"fastabx_version": fastabx.__version__ if hasattr(fastabx, "__version__") else "0.9.0",
            "distance": "angular", "subsampling": None,
            "sets": {name: fastabx_scores(d) for name, d in sets.items()}}
  with open(os.path.join(args.out, "abx_fastabx.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
