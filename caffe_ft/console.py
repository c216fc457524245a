"""The ``caffe-ft`` console script.

The plainest forms of the read-only commands (``fmt FILE``, ``inspect FILE``,
``diff A B``) run without importing click (:func:`caffe_ft.commands.run_plain`):
click's import is ~10 ms of a 60 ms ``fmt``.  Every other command line, and
every one of those that fails, goes to :mod:`caffe_ft.cli`'s click group,
which gives the options, ``--help``, the usage and the error messages.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the command line in ``sys.argv``; exit with its status."""
    from .commands import run_plain

    code = run_plain(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from .cli import main as cli

    cli()


if __name__ == "__main__":
    main()
