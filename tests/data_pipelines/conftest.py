"""Fixtures: real recordings in ../shared/data (read in place), a small synthetic corpus."""

import os

import pytest

HERE = os.path.dirname(__file__)
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "..", "shared", "data"))


def shared(*parts):
  path = os.path.join(SHARED, *parts)
  if not os.path.exists(path):
    pytest.skip(f"{path} not present")
  return path


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
  """40 utterances from all 8 synthetic speakers (cached per session)."""
  from data_pipelines import synth

  try:
    synth.check_tools(s.voice for s in synth.SPEAKERS.values())
  except RuntimeError as e:
    pytest.skip(str(e))
  return synth.synthesize_corpus(tmp_path_factory.mktemp("synth") / "c", 40, seed=3)
