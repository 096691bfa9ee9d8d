"""Checkpoint loading errors name what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxspeech.interop import hf
from jaxspeech.models.speech_encoder import EncoderConfig, SpeechEncoder


@pytest.fixture()
def tiny_ckpt(tmp_path):
  model = SpeechEncoder(EncoderConfig.preset("tiny", model_type="wavlm"), rngs=nnx.Rngs(0))
  hf.save_hf_checkpoint(model, tmp_path)
  return tmp_path, model


def test_round_trip_is_exact(tiny_ckpt):
  path, model = tiny_ckpt
  back = hf.load_encoder(path)
  a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  b = nnx.to_pure_dict(nnx.state(back, nnx.Param))
  import jax

  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_unknown_and_missing_keys_are_listed(tiny_ckpt):
  path, _ = tiny_ckpt
  sd = hf.read_state_dict(path)
  sd["encoder.layers.0.attention.surprise.weight"] = np.zeros((2, 2), np.float32)
  del sd["encoder.layers.1.feed_forward.output_dense.bias"]
  save_file(sd, str(path / "model.safetensors"))
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_hf_checkpoint(path)
  msg = str(e.value)
  assert "encoder.layers.0.attention.surprise.weight" in msg
  assert "encoder/layers/1/feed_forward/output_dense/bias" in msg


def test_task_heads_are_skipped_and_prefix_stripped(tiny_ckpt):
  path, model = tiny_ckpt
  sd = {"wavlm." + k: v for k, v in hf.read_state_dict(path).items()}
  sd["lm_head.weight"] = np.zeros((32, 128), np.float32)
  save_file(sd, str(path / "model.safetensors"))
  cfg, params = hf.load_hf_checkpoint(path)
  assert cfg == model.config
  with pytest.raises(hf.CheckpointError, match="lm_head.weight"):
    hf.load_hf_checkpoint(path, ignore=None)


def test_shape_mismatch_and_missing_files(tiny_ckpt, tmp_path_factory):
  path, _ = tiny_ckpt
  cfg = json.loads((path / "config.json").read_text())
  cfg["intermediate_size"] = 256
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match="shape mismatches"):
    hf.load_hf_checkpoint(path)
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(hf.CheckpointError, match="config.json"):
    hf.load_hf_checkpoint(empty)
  (empty / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
    hf.load_hf_checkpoint(empty)


def test_unsupported_config_raises():
  with pytest.raises(hf.CheckpointError, match="model_type"):
    hf.config_from_hf({"model_type": "bert"})
  with pytest.raises(NotImplementedError, match="add_adapter"):
    hf.config_from_hf({"model_type": "wav2vec2", "add_adapter": True})
