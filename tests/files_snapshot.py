"""A test helper: what files a directory holds, to assert that a refused command wrote nothing."""

import os


def snapshot(root) -> dict[str, tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file under `root`."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      st = os.stat(os.path.join(d, f))
      out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
  return out
