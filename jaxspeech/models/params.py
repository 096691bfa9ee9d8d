"""Pure operations on parameter trees (nested dicts of arrays): sub-trees, merges, checks.

Used by `Method.load_pretrained` (an encoder merged into a bigger model) and by checkpoint
loading; no I/O here.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxspeech.errors import UserError

PyTree = Any
SHOWN = 5  # keys listed per kind of mismatch (then "and N more")


class ParamsMismatchError(UserError, ValueError):
  """Parameters that do not fit the configured model (a checkpoint of another architecture)."""


def _listed(keys: list[str]) -> str:
  more = f' and {len(keys) - SHOWN} more' if len(keys) > SHOWN else ''
  return ', '.join(keys[:SHOWN]) + more


def flat_shapes(tree) -> dict[str, tuple]:
  """{'a/b/c': shape} of every leaf."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(getattr(x, 'shape', ()))
          for p, x in flat}


def check_same_tree(want: PyTree, have: PyTree, what: str) -> None:
  """Raises ParamsMismatchError (a ValueError) naming, in one line, the mis-shaped leaves of
  `have` and, separately, the leaves it lacks (missing) or has in excess (unexpected); a leaf with
  the wrong shape is only reported as such, never also as missing."""
  w, h = flat_shapes(want), flat_shapes(have)
  missing = sorted(set(w) - set(h))
  extra = sorted(set(h) - set(w))
  bad = sorted(k for k in set(w) & set(h) if w[k] != h[k])
  if missing or extra or bad:
    msg = [f'{what}: parameters do not match the configured model:']
    if bad:
      msg.append(f'shape mismatch ({len(bad)} of {len(w)}): '
                 + _listed([f'{k} want {w[k]} have {h[k]}' for k in bad]) + ';')
    if missing:
      msg.append(f'missing ({len(missing)}): {_listed(missing)};')
    if extra:
      msg.append(f'unexpected ({len(extra)}): {_listed(extra)};')
    raise ParamsMismatchError(' '.join(msg).rstrip(';'))


def subtree(params: PyTree, prefix: tuple[str, ...], what: str = 'params') -> PyTree:
  node = params
  for k in prefix:
    if not isinstance(node, dict) or k not in node:
      raise ValueError(f'{what}: the model has no parameter group {"/".join(prefix)!r}')
    node = node[k]
  return node


def merge_subtree(params: PyTree, prefix: tuple[str, ...], sub: PyTree, what: str) -> PyTree:
  """Returns `params` with `params[prefix...]` replaced by `sub` (same keys and shapes, checked);
  `sub` leaves are cast to the existing leaves' dtype and placed in their shardings."""
  node = subtree(params, prefix, what)
  check_same_tree(node, sub, what)
  placed = jax.tree.map(
    lambda old, new: jax.device_put(np.asarray(new, dtype=old.dtype), old.sharding), node, sub)

  def rebuild(tree, keys):
    if not keys:
      return placed
    return {**tree, keys[0]: rebuild(tree[keys[0]], keys[1:])}

  return rebuild(params, list(prefix))
