"""HF transformers checkpoints (wav2vec2 / HuBERT / WavLM / data2vec-audio) <-> jaxspeech encoder
parameters.

A checkpoint directory holds `config.json` and `model.safetensors` (read with `safetensors.numpy`,
no torch needed), a sharded `model.safetensors.index.json`, or `pytorch_model.bin` (needs torch).
Every checkpoint key must map to an encoder parameter and every encoder parameter must be found;
otherwise `CheckpointError` lists the offending keys. Heads of task models (e.g. `lm_head` of
`*ForCTC`) are not part of the encoder: skip them with `ignore=`.

HF checkpoints are per layer; an encoder with `scan_layers=True` holds its blocks stacked. Loading
converts with `stack_layers` and saving with `unstack_layers`, so either layout reads and writes
the same HF files. The jaxspeech-only scale fields (`RUNTIME_FIELDS`) are never read from or
written to an HF `config.json`.

data2vec-audio (`Data2VecAudioModel`) is a post-LN wav2vec2 with a layer-norm extractor and a
stack of positional convs. Its config names the stack's depth `num_conv_pos_embeddings` and its
kernel `conv_pos_kernel_size`; jaxspeech's `EncoderConfig` keeps wav2vec2's meaning of
`num_conv_pos_embeddings` (the kernel) and holds the depth in `pos_conv_depth`, so those two keys
are translated both ways. HF's wav2vec2 / HuBERT / WavLM have no such stack: an encoder with
`pos_conv_depth > 1` is written only as data2vec-audio.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jaxspeech.errors import UserError
from jaxspeech.models.speech_encoder import (
  EncoderConfig,
  SpeechEncoder,
  stack_layers,
  to_layer_layout,
)

_PREFIXES = ("wav2vec2.", "hubert.", "wavlm.", "data2vec_audio.")
HF_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
ARCHITECTURES = {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel", "wavlm": "WavLMModel",
                 "data2vec-audio": "Data2VecAudioModel"}
TASK_HEADS = (
  r"^(lm_head|projector|classifier|quantizer|project_q|project_hid|final_proj|"
  r"label_embs_concat|dropout|tdnn|feature_extractor_head|objective)\b"
)


# EncoderConfig fields that choose how jaxspeech runs a model, not what the model is (HF 5.x
# configs also carry a `dtype` key of their own, which must not become the compute dtype).
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat")


class CheckpointError(UserError, ValueError):
  """A checkpoint that does not match the encoder, or an unreadable one; the message names the
  file and lists the keys."""


class UnsupportedCheckpointError(CheckpointError, NotImplementedError):
  """A valid HF checkpoint with an architecture option jaxspeech does not implement."""


SHOWN = 5  # keys listed per kind of mismatch (then "and N more")


def _listed(keys: list[str]) -> str:
  more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
  return ", ".join(keys[:SHOWN]) + more


def config_from_hf(d: dict, where: str = "config.json") -> EncoderConfig:
  """HF `config.json` dict -> EncoderConfig (`where` names the file in errors). Unsupported
  architecture options raise UnsupportedCheckpointError; a config that is no JSON object, lacks
  `model_type` or has a field of the wrong type raises CheckpointError."""
  if not isinstance(d, dict):
    raise CheckpointError(f"{where}: not an HF model config (a JSON object), got "
                          f"{type(d).__name__}")
  mt = d.get("model_type")
  if mt not in HF_MODEL_TYPES:
    raise CheckpointError(
      f"{where}: model_type {mt!r} is not a wav2vec2/hubert/wavlm/data2vec-audio checkpoint"
    )
  unsupported = {
    "add_adapter": False,
    "conv_pos_batch_norm": False,
    "use_weighted_layer_sum": None,
  }
  for key, ok in unsupported.items():
    if ok is not None and d.get(key, ok) != ok:
      raise UnsupportedCheckpointError(f"{where}: {key}={d[key]!r} is not supported by jaxspeech")
  if d.get("feat_extract_activation", "gelu") != "gelu":
    raise UnsupportedCheckpointError(
      f"{where}: feat_extract_activation={d['feat_extract_activation']!r} (only gelu)"
    )
  if d.get("position_embeddings_type") not in (None, "conv"):
    raise UnsupportedCheckpointError(
      f"{where}: position_embeddings_type={d['position_embeddings_type']!r} (only conv)"
    )
  fields = {f for f in EncoderConfig.__dataclass_fields__ if f not in RUNTIME_FIELDS}
  kw = {k: d[k] for k in fields if k in d}
  kw["model_type"] = mt
  if mt == "data2vec-audio":
    # Data2VecAudioConfig defaults (5 convs of kernel 19); the extractor is always layer-normed
    # and the encoder post-LN, whatever stray keys of those names the file holds.
    depth = d.get("num_conv_pos_embeddings", 5)
    if not (isinstance(depth, int) and depth > 1):
      raise UnsupportedCheckpointError(
        f"{where}: data2vec-audio with num_conv_pos_embeddings={depth!r} positional convs "
        "(jaxspeech implements stacks of 2 or more)"
      )
    kw.update(pos_conv_depth=depth, num_conv_pos_embeddings=d.get("conv_pos_kernel_size", 19),
              feat_extract_norm="layer", do_stable_layer_norm=False, feat_proj_layer_norm=True)
  else:
    kw["pos_conv_depth"] = 1  # HF's wav2vec2 / HuBERT / WavLM: always one weight-normed conv
  try:
    return EncoderConfig(**kw)
  except (TypeError, ValueError) as e:  # e.g. "conv_dim": 5, "feat_extract_norm": "batch"
    raise CheckpointError(f"{where}: {e}") from None


def config_to_hf(cfg: EncoderConfig) -> dict:
  """EncoderConfig -> HF `config.json` dict. CheckpointError for an encoder HF's class of its
  `model_type` cannot express (a positional conv stack outside data2vec-audio, or data2vec-audio
  with a group-norm extractor, pre-LN blocks or a single conv)."""
  if cfg.model_type == "data2vec-audio":
    wrong = [f"{k}={getattr(cfg, k)!r}" for k, ok in (
      ("feat_extract_norm", cfg.feat_extract_norm == "layer"),
      ("do_stable_layer_norm", not cfg.do_stable_layer_norm),
      ("feat_proj_layer_norm", cfg.feat_proj_layer_norm),
      ("pos_conv_depth", cfg.pos_conv_depth > 1),
    ) if not ok]
    if wrong:
      raise CheckpointError(f"HF Data2VecAudioModel cannot hold an encoder with {', '.join(wrong)}")
  elif cfg.pos_conv_depth > 1:
    raise CheckpointError(
      f"HF {ARCHITECTURES[cfg.model_type]} has a single positional conv, not "
      f"pos_conv_depth={cfg.pos_conv_depth}; such an encoder (layer-norm extractor, post-LN) is "
      "written as model_type='data2vec-audio'"
    )
  d = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS}
  d.update({k: list(v) for k, v in d.items() if isinstance(v, tuple)})
  depth = d.pop("pos_conv_depth")
  if cfg.model_type == "data2vec-audio":  # HF's names: see the module docstring
    d["conv_pos_kernel_size"], d["num_conv_pos_embeddings"] = cfg.num_conv_pos_embeddings, depth
  d["num_feat_extract_layers"] = len(cfg.conv_dim)
  d["feat_extract_activation"] = "gelu"
  d["mask_time_prob"] = 0.05  # keeps `masked_spec_embed` in HF's model
  d["architectures"] = [ARCHITECTURES[cfg.model_type]]
  return d


# (HF key regex, jaxspeech path template, numpy transform HF->jax)
_T = lambda a: np.ascontiguousarray(a.T)  # Linear: torch (out, in) -> (in, out)
_CONV = lambda a: np.ascontiguousarray(a.transpose(2, 1, 0))  # Conv1d (O, I, K) -> (K, I, O)
_ID = lambda a: a
_RULES: list[tuple[str, str, Callable]] = [
  (
    r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight",
    r"feature_extractor/conv_layers/\1/conv/kernel",
    _CONV,
  ),
  (
    r"feature_extractor\.conv_layers\.(\d+)\.conv\.bias",
    r"feature_extractor/conv_layers/\1/conv/bias",
    _ID,
  ),
  (
    r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.weight",
    r"feature_extractor/conv_layers/\1/norm/scale",
    _ID,
  ),
  (
    r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.bias",
    r"feature_extractor/conv_layers/\1/norm/bias",
    _ID,
  ),
  (r"feature_projection\.layer_norm\.weight", "feature_projection/layer_norm/scale", _ID),
  (r"feature_projection\.layer_norm\.bias", "feature_projection/layer_norm/bias", _ID),
  (r"feature_projection\.projection\.weight", "feature_projection/projection/kernel", _T),
  (r"feature_projection\.projection\.bias", "feature_projection/projection/bias", _ID),
  (r"masked_spec_embed", "masked_spec_embed", _ID),
  (
    r"encoder\.pos_conv_embed\.conv\.(?:parametrizations\.weight\.original0|weight_g)",
    "encoder/pos_conv_embed/weight_g",
    lambda a: a.reshape(-1),
  ),
  (
    r"encoder\.pos_conv_embed\.conv\.(?:parametrizations\.weight\.original1|weight_v)",
    "encoder/pos_conv_embed/weight_v",
    _CONV,
  ),
  (r"encoder\.pos_conv_embed\.conv\.bias", "encoder/pos_conv_embed/bias", _ID),
  (  # data2vec-audio's stack (no weight norm)
    r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.weight",
    r"encoder/pos_conv_embed/layers/\1/kernel",
    _CONV,
  ),
  (
    r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.bias",
    r"encoder/pos_conv_embed/layers/\1/bias",
    _ID,
  ),
  (r"encoder\.layer_norm\.weight", "encoder/layer_norm/scale", _ID),
  (r"encoder\.layer_norm\.bias", "encoder/layer_norm/bias", _ID),
  (
    r"encoder\.layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj|out_proj|gru_rel_pos_linear)\.weight",
    r"encoder/layers/\1/attention/\2/kernel",
    _T,
  ),
  (
    r"encoder\.layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj|out_proj|gru_rel_pos_linear)\.bias",
    r"encoder/layers/\1/attention/\2/bias",
    _ID,
  ),
  (
    r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const",
    r"encoder/layers/\1/attention/gru_rel_pos_const",
    lambda a: a.reshape(-1),
  ),
  (
    r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.weight",
    r"encoder/layers/\1/attention/rel_attn_embed/embedding",
    _ID,
  ),
  (
    r"encoder\.layers\.(\d+)\.(layer_norm|final_layer_norm)\.weight",
    r"encoder/layers/\1/\2/scale",
    _ID,
  ),
  (
    r"encoder\.layers\.(\d+)\.(layer_norm|final_layer_norm)\.bias",
    r"encoder/layers/\1/\2/bias",
    _ID,
  ),
  (
    r"encoder\.layers\.(\d+)\.feed_forward\.(intermediate_dense|output_dense)\.weight",
    r"encoder/layers/\1/feed_forward/\2/kernel",
    _T,
  ),
  (
    r"encoder\.layers\.(\d+)\.feed_forward\.(intermediate_dense|output_dense)\.bias",
    r"encoder/layers/\1/feed_forward/\2/bias",
    _ID,
  ),
]
_COMPILED = [(re.compile(p + r"$"), t, f) for p, t, f in _RULES]
OPTIONAL = ("masked_spec_embed",)  # HF omits it when the config has no masking


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Raw tensors of an HF checkpoint directory as numpy float32 arrays."""
  path = os.fspath(path)
  st, idx, pt = (
    os.path.join(path, n)
    for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
  )
  if os.path.exists(st) or os.path.exists(idx):
    from safetensors.numpy import load_file

    if os.path.exists(st):
      files = [st]
    else:
      index = _read_json(idx)
      if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{idx}: no weight_map (not a safetensors index)")
      files = sorted({os.path.join(path, f) for f in index["weight_map"].values()})
    sd = {}
    for f in files:
      try:
        sd.update(load_file(f))
      except FileNotFoundError:
        raise CheckpointError(f"{f}: no such file (named by {idx})") from None
      except Exception as e:  # noqa: BLE001 -- safetensors' own errors: a damaged file
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
  elif os.path.exists(pt):
    try:
      import torch
    except ImportError as e:
      raise CheckpointError(
        f"{pt}: reading pytorch_model.bin needs torch "
        "(pip install jaxspeech[interop]); safetensors does not"
      ) from e
    try:
      loaded = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch's unpickling errors: a damaged file
      raise CheckpointError(f"{pt}: not a readable PyTorch state dict ({e})") from None
    sd = {k: v.float().numpy() for k, v in loaded.items()}
  else:
    raise CheckpointError(
      f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )
  return {k: np.asarray(v, dtype=np.float32) for k, v in sd.items()}


def _set(tree: dict, path: str, value):
  keys = [int(k) if k.isdigit() else k for k in path.split("/")]
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _flat_paths(tree, prefix=()) -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat_paths(v, prefix + (str(k),)))
    else:
      out["/".join(prefix + (str(k),))] = v
  return out


def convert_state_dict(
  sd: dict[str, np.ndarray], cfg: EncoderConfig, ignore: str | None = TASK_HEADS,
  where: str = "checkpoint",
) -> dict:
  """HF state dict -> nested pure dict for `nnx.replace_by_pure_dict` on a SpeechEncoder of
  `cfg` (float32 numpy leaves; stacked by `stack_layers` when `cfg.scan_layers`). A mismatch
  raises one CheckpointError (`where` names the checkpoint) listing, separately, the tensors of
  the wrong shape, the unknown keys and the parameters the checkpoint lacks."""
  loop_cfg = dataclasses.replace(cfg, scan_layers=False)  # HF keys are per layer
  ref = _flat_paths(
    nnx.to_pure_dict(
      nnx.state(nnx.eval_shape(lambda: SpeechEncoder(loop_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    )
  )
  ign = re.compile(ignore) if ignore else None
  out, found, unknown, bad_shape = {}, set(), [], []  # found: present, of any shape
  for key, arr in sd.items():
    k = key
    for p in _PREFIXES:
      if k.startswith(p):
        k = k[len(p) :]
        break
    if ign is not None and ign.search(k):
      continue
    for rx, tmpl, fn in _COMPILED:
      m = rx.match(k)
      if m:
        path, val = m.expand(tmpl), fn(arr)
        break
    else:
      unknown.append(key)
      continue
    if path not in ref:
      unknown.append(key)
      continue
    found.add(path)  # present: a wrong shape is a mismatch, not a missing parameter
    if tuple(ref[path].shape) != val.shape:
      bad_shape.append(f"{key}: {val.shape} vs expected {tuple(ref[path].shape)}")
      continue
    _set(out, path, val)
  missing = sorted(p for p in ref if p not in found and p not in OPTIONAL)
  if unknown or missing or bad_shape:
    msg = []
    if bad_shape:
      msg.append(f"shape mismatches ({len(bad_shape)}): {_listed(bad_shape)}")
    if unknown:
      msg.append(f"unknown keys ({len(unknown)}): {_listed(sorted(unknown))}")
    if missing:
      msg.append(f"missing parameters ({len(missing)}): {_listed(missing)}")
    raise CheckpointError(f"{where}: the weights do not match the encoder config; "
                          + "; ".join(msg))
  return stack_layers(out) if cfg.scan_layers else out


def load_hf_checkpoint(path: str | os.PathLike, ignore: str | None = TASK_HEADS):
  """Reads an HF checkpoint dir. Returns (EncoderConfig, nested pure dict of params)."""
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{cfg_path}: no such file (not an HF checkpoint directory)")
  cfg = config_from_hf(_read_json(cfg_path), where=cfg_path)
  sd = read_state_dict(path)
  try:
    return cfg, convert_state_dict(sd, cfg, ignore=ignore, where=path)
  except CheckpointError:
    raise
  except ValueError as e:  # the encoder of `cfg` cannot be built, e.g. 32 dims in 12 heads
    raise CheckpointError(f"{cfg_path}: describes no valid encoder ({e})") from None


def _read_json(path: str):
  """A JSON file of a checkpoint; CheckpointError naming it when it is not JSON."""
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def feature_extractor_normalizes(path: str | os.PathLike) -> bool:
  """Whether the checkpoint's waveforms are normalised per utterance before the model: the
  `do_normalize` of its `preprocessor_config.json`, True without one (the default of
  transformers' Wav2Vec2FeatureExtractor, and what jaxspeech's training pipeline does)."""
  pre = os.path.join(os.fspath(path), "preprocessor_config.json")
  if not os.path.exists(pre):
    return True
  d = _read_json(pre)
  if not isinstance(d, dict):
    raise CheckpointError(f"{pre}: not a preprocessor config (a JSON object)")
  return bool(d.get("do_normalize", True))


def load_encoder(path: str | os.PathLike, **config_overrides) -> SpeechEncoder:
  """An HF checkpoint directory as a ready SpeechEncoder, optionally with jaxspeech's scale
  fields, e.g. `load_encoder(path, dtype='bfloat16', scan_layers=True)`. Parameters are cast to
  `param_dtype`."""
  cfg, params = load_hf_checkpoint(path)
  if config_overrides:
    cfg = dataclasses.replace(cfg, **config_overrides)
  model = nnx.eval_shape(lambda: SpeechEncoder(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  if "masked_spec_embed" not in params:  # keep a deterministic init for the optional vector
    params["masked_spec_embed"] = np.zeros((cfg.hidden_size,), np.float32)
  params = to_layer_layout(params, cfg.scan_layers)
  want = nnx.to_pure_dict(state)  # ShapeDtypeStructs: the dtype each parameter is stored in
  nnx.replace_by_pure_dict(
    state, jax.tree.map(lambda ref, a: np.asarray(a, dtype=ref.dtype), want, params)
  )
  nnx.update(model, state)
  return model


def to_hf_state_dict(model: SpeechEncoder) -> dict[str, np.ndarray]:
  """Encoder params -> HF base-model state dict (weight-norm stored as weight_g / weight_v), from
  either layer layout."""
  params = to_layer_layout(nnx.to_pure_dict(nnx.state(model, nnx.Param)), False)
  flat = _flat_paths(params)
  out = {}
  for path, val in flat.items():
    a = np.asarray(val, dtype=np.float32)
    key = path.replace("/", ".")
    if path == "encoder/pos_conv_embed/weight_g":
      out["encoder.pos_conv_embed.conv.weight_g"] = a.reshape(1, 1, -1)
    elif path == "encoder/pos_conv_embed/weight_v":
      out["encoder.pos_conv_embed.conv.weight_v"] = a.transpose(2, 1, 0)
    elif path == "encoder/pos_conv_embed/bias":
      out["encoder.pos_conv_embed.conv.bias"] = a
    elif path.startswith("encoder/pos_conv_embed/layers/"):  # data2vec-audio's stack
      name = key.replace(".kernel", ".weight").rsplit(".", 1)
      out[".conv.".join(name)] = a.transpose(2, 1, 0) if path.endswith("/kernel") else a
    elif path.endswith("gru_rel_pos_const"):
      out[key] = a.reshape(1, -1, 1, 1)
    elif path.endswith("rel_attn_embed/embedding"):
      out[key.replace(".embedding", ".weight")] = a
    elif path.startswith("feature_extractor") and path.endswith("conv/kernel"):
      out[key.replace(".kernel", ".weight")] = a.transpose(2, 1, 0)
    elif path.startswith("feature_extractor") and "/norm/" in path:
      out[key.replace(".norm.", ".layer_norm.").replace(".scale", ".weight")] = a
    elif path.endswith("/kernel"):
      out[key.replace(".kernel", ".weight")] = a.T
    elif path.endswith("/scale"):
      out[key.replace(".scale", ".weight")] = a
    else:
      out[key] = a
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_hf_checkpoint(model: SpeechEncoder, path: str | os.PathLike,
                       do_normalize: bool = True) -> None:
  """Writes `config.json` + `model.safetensors` that transformers' *Model classes load, and the
  `preprocessor_config.json` of its `Wav2Vec2FeatureExtractor`: `do_normalize` (per-utterance
  zero mean / unit variance; True = what jaxspeech's training pipeline feeds every model) and,
  as in HF's own configs, an attention mask only for layer-norm extractors (HF's group-norm
  extractors see the padding)."""
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(model.config), f, indent=2)
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump({
      "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
      "sampling_rate": 16000, "padding_value": 0.0, "padding_side": "right",
      "do_normalize": bool(do_normalize),
      "return_attention_mask": model.config.feat_extract_norm == "layer",
    }, f, indent=2)
  save_file(to_hf_state_dict(model), os.path.join(path, "model.safetensors"))
