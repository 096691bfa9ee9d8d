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
    return USER_EXIT
  return result if isinstance(result, int) and not isinstance(result, bool) else 0


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message starts with its key (`config.a.b=...`)."""
