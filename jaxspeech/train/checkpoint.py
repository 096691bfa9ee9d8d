"""Orbax checkpoints of the train state + the Grain data iterator, and `config.init_from`.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. Orbax writes each step into a temporary folder
and renames it when complete (atomic: a run killed mid-save leaves the previous step as the latest
one); `max_to_keep` old steps are kept. The data iterator is saved by Grain's own Orbax handler
(one JSON file per process), so multi-host runs each resume their own shard.

Resume order (`restore_or_init` in the trainer): the workdir's latest checkpoint -> `init_from`
(parameters only) -> scratch.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxspeech.errors import UserError, one_line_reason
from jaxspeech.models import params as params_lib

PyTree = Any


class CheckpointFileError(UserError, ValueError):
  """A checkpoint that cannot be read (damaged files, no parameters); names the source."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items 'state' and (optionally) 'data'."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, data_iterator=None, *, force: bool = False) -> bool:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: PyTree, data_iterator=None) -> PyTree:
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def quarantine(self, step: int, folder: str) -> str:
    """Moves checkpoint `step` out of the managed folder into `folder/<step>[.n]` (kept for
    inspection, never restored) and re-reads the folder. Returns the new path."""
    import shutil

    os.makedirs(folder, exist_ok=True)
    dst, n = os.path.join(folder, str(step)), 0
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(folder, f'{step}.{n}')
    shutil.move(os.fspath(self.directory / str(step)), dst)
    self.manager.reload()
    return dst

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params_from_workdir(workdir: str, abstract_state: PyTree,
                                label: str | None = None) -> tuple[PyTree, int]:
  """Parameters of the latest checkpoint in another jaxspeech workdir (other items ignored).

  `label` names the source in error messages as the user gave it (default
  `config.init_from='<workdir>'`; e.g. `--checkpoint W` from the evaluation CLIs).
  Returns (params placed in `abstract_state['params']`'s shardings, the step they come from).
  """
  label = label or f'config.init_from={workdir!r}'
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.exists():
    raise FileNotFoundError(f'{label}: no {directory} (not a jaxspeech '
                            'workdir with checkpoints, nor an HF checkpoint folder)')
  mngr = ocp.CheckpointManager(
    directory, item_names=('state', 'data'),
    # Grain's handler named for 'data' (never restored here): Orbax warns about any item on disk
    # it has no handler for, once per metadata read.
    item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                   'data': grain.checkpoint.CheckpointHandler()})
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'{label}: {directory} holds no checkpoint')
    try:
      meta = mngr.item_metadata(step)['state']
    except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore raise many types for bad files
      raise CheckpointFileError(f'{label}: checkpoint step {step} cannot be read '
                                f'({one_line_reason(e)})') from e
    meta = getattr(meta, 'tree', meta)
    if not isinstance(meta, dict) or 'params' not in meta:
      raise CheckpointFileError(f'{label}: checkpoint step {step} has no params')
    abstract_params = abstract_state['params']
    _check_same_tree(abstract_params, meta['params'], label)
    # Partial restore: only the 'params' subtree is read, into this run's shardings.
    target = {'params': abstract_params}
    restore_args = {'params': jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      abstract_params)}
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointFileError(f'{label}: checkpoint step {step} cannot be restored '
                                f'({one_line_reason(e)})') from e
  finally:
    mngr.close()
  return restored['state']['params'], step


# Re-exported: pure tree operations live in jaxspeech.models.params.
merge_subtree = params_lib.merge_subtree
_check_same_tree = params_lib.check_same_tree


def load_workdir_model(workdir: str, make_method=None, label: str | None = None):
  """A training workdir's model on one device: (method, model with the latest checkpoint's
  parameters, config, setup). `make_method(config)` builds the method (default: `get_method`).
  `label`: how errors name the workdir (see `restore_params_from_workdir`).
  The one loader behind `extract`, `evaluate` and `eval.asr`."""
  import json

  import ml_collections
  from flax import nnx

  from jaxspeech.methods.base import get_method
  from jaxspeech.train import partitioning
  from jaxspeech.train import step as step_lib

  workdir = os.path.abspath(workdir)  # Orbax needs absolute paths
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'{workdir}: no config.json (not a jaxspeech training workdir)')
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.shape = {'data': 1, 'fsdp': 1, 'model': 1}
  method = (make_method or get_method)(config)
  # Derived host state (vocabularies...) comes from the workdir, never from a manifest.
  host_path = os.path.join(workdir, 'host_state.json')
  host_state = {}
  if os.path.exists(host_path):
    with open(host_path) as f:
      host_state = json.load(f)
  method.set_host_state(host_state)
  mesh = partitioning.create_mesh(config.mesh, devices=jax.devices()[:1])
  setup = step_lib.build_setup(config, method, mesh)
  params, _ = restore_params_from_workdir(workdir, setup.abstract_state, label=label)
  model, _ = method.init(jax.random.key(0))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(state, params)
  return method, nnx.merge(graphdef, state, rest), config, setup
