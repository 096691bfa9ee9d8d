"""User errors and the one top-level handler every command line uses.

A *user error* is a mistake in what the user gave us (a config key, a path, a data file, a
workdir): it is reported as ONE line naming the key or file, and the command exits with status 2.
Anything else is a bug and keeps its traceback. Error classes that are user errors inherit
`UserError` (next to their usual base, e.g. `ValueError`), so library callers can still catch
them as before:

    class ManifestError(UserError, ValueError): ...

    def main(argv=None) -> int: ...
    if __name__ == '__main__':
      sys.exit(errors.run_cli(main))

This module imports nothing of the project, so every layer (the public library included) may use
it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import Any

USER_EXIT = 2

# OS errors about a path the user named (missing file, a folder where a file was expected, no
# permission): user errors too. Other OSErrors (disk full, I/O errors) keep their traceback.
_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                   FileExistsError)


class UserError(Exception):
  """Something the user gave is wrong; `str(e)` is one line that names the key or file."""


def is_user_error(e: BaseException) -> bool:
  return isinstance(e, (UserError, *_USER_OS_ERRORS))


def one_line(e: BaseException) -> str:
  """The message of `e` as one line (OS errors as `strerror: filename`)."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    msg = f'{e.strerror}: {e.filename}'
  else:
    msg = str(e) or type(e).__name__
  return ' '.join(msg.split())


def one_line_reason(e: BaseException) -> str:
  """`Type: first line of the message` of the innermost cause of an exception (Orbax wraps the
  TensorStore error that names the bad file; both run to dozens of lines), at most 200
  characters."""
  seen = set()
  while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), '')
  text = f'{type(e).__name__}: {first}' if first else type(e).__name__
  return text if len(text) <= 200 else text[:197] + '...'


def run_cli(main: Callable[..., Any], *args, prog: str | None = None, **kwargs) -> int:
  """`main(*args, **kwargs)`; a user error prints `PROG: error: <one line>` to stderr and returns
  2, anything else propagates (a bug: traceback). Returns main's result when it is an int, else
  0."""
  try:
    result = main(*args, **kwargs)
  except BaseException as e:  # noqa: BLE001 -- re-raised unless a user error
    if not is_user_error(e):
      raise
    name = prog or (sys.argv[0].rsplit('/', 1)[-1] if sys.argv and sys.argv[0] else 'jaxspeech')
    print(f'{name}: error: {one_line(e)}', file=sys.stderr, flush=True)
    # The process is about to exit: what a library left half-done when the error was raised
    # (e.g. Orbax's never-awaited reads of a damaged checkpoint) must not print tracebacks after
    # the one line.
    sys.unraisablehook = lambda unraisable: None
    logging.getLogger('asyncio').disabled = True  # "Task exception was never retrieved"
    return USER_EXIT
  return result if isinstance(result, int) and not isinstance(result, bool) else 0


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message starts with its key (`config.a.b=...`)."""


# ---------------------------------------------------------------------------------------------
# absl command lines (`app.run(main, flags_parser=absl_flags_parser(PROG))`).


def absl_flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """A flags parser for `absl.app.run`: a bad flag, a `--config.<key>` override naming no field
  (ml_collections raises KeyError/AttributeError with a "Did you mean" hint from inside the flags
  library) or a config file that is not Python is one line `PROG: error: ...`, exit 2 -- not
  absl's usage dump (exit 1) or a traceback."""

  def parse(argv: list[str]) -> list[str]:
    from absl import flags

    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      _usage_error(prog, _flag_error_line(e))
    except (AttributeError, KeyError) as e:
      _usage_error(prog, _override_error_line(e, argv))
    except SyntaxError as e:
      _usage_error(prog, f'--config {e.filename}: line {e.lineno}: {e.msg}')
    raise AssertionError('unreachable')

  return parse


def loaded_config(holder, flag: str = 'config'):
  """The value of an ml_collections `DEFINE_config_file` flag; a config file that failed to load
  (missing, or raising while it builds) is a UserError naming it -- ml_collections defers that
  error to the first use of the config, as an OSError holding its own traceback."""
  import os

  from absl import flags
  from ml_collections import config_flags

  try:
    config = holder.value
    config.keys()  # a config file that failed to load raises on first use
    return config
  except OSError as e:
    name = config_flags.get_config_filename(flags.FLAGS[flag]).split(':')[0]
    if not os.path.exists(name):
      raise UserError(f'--{flag} {name}: no such file') from None
    raise UserError(f'--{flag} {name}: {_flag_error_line(e)}') from None


def _usage_error(prog: str, message: str):
  print(f'{prog}: error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.exit(USER_EXIT)


def _flag_error_line(e: BaseException) -> str:
  """absl's flag errors as one line: a config file's traceback shrinks to its last line."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  if len(lines) > 1:
    return f'{lines[0]} {lines[-1]}'
  return lines[0] if lines else type(e).__name__


def _override_error_line(e: BaseException, argv: list[str]) -> str:
  """ml_collections' error for `--config.a.b=v` naming no field, as one line naming the flag."""
  text = str(e).replace('\\n', ' ').replace("\\'", "'")
  names = re.findall(r"'([A-Za-z0-9_]+)'", text)
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  bad = hint.group(2) if hint else (names[0] if names else '')
  flag = next((a.split('=', 1)[0] for a in argv[1:]
               if a.startswith('--config.') and bad in a.split('=', 1)[0].split('.')), '')
  if not flag or not bad:
    return f'--config: {one_line(e)}'
  return (f'{flag}: the config has no field {bad!r}'
          + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
