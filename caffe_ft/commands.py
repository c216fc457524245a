"""What the read-only commands (``fmt``, ``inspect``, ``diff``) do, without click.

:mod:`caffe_ft.cli` runs them with their options; :mod:`caffe_ft.console`
runs their plainest forms (``fmt FILE``, ``inspect FILE``, ``diff A B``)
without importing click at all, which is a sixth of such a run.  Both call
the functions here, so the two paths print the same.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .formats.schema import Schema


def emit(text: str) -> None:
    """Print ``text``; bytes of the input that are not UTF-8 (in comments and
    strings, kept as surrogates) go out as they came in."""
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stdout.flush()


def format_files(files: Sequence[str], schema: Schema) -> List[Tuple[str, bytes, str]]:
    """Each of ``files`` (path, its bytes, its text as Caffe's tools print it),
    every file parsed before any is returned, so that one bad file means
    nothing is written."""
    from .formats.files import load_checked_tree
    from .formats.layout import format_tree

    results = []
    for path in files:
        data, tree = load_checked_tree(path, schema)  # no message: fmt needs none (nor protobuf)
        results.append((path, data, format_tree(tree)))
    return results


def describe_file(file: str, input_shapes: Callable[[], Dict[str, Tuple[int, ...]]],
                  schema: Schema) -> Tuple[Any, Callable[[Any], str]]:
    """What ``inspect`` shows of ``file`` (a net, solver, caffemodel, mean file,
    solverstate or ONNX model), and the function that prints it as text
    (``report.as_json`` gives what ``--json`` prints);
    ``input_shapes()`` gives the shapes of a net's data layers' tops (asked only for a net)."""
    from .formats import files
    from .net import report

    head = files.read_head(file)  # never the whole file: a caffemodel is mapped, not read
    format_info: Callable[[Any], str]
    info: Any
    if file.endswith(".onnx"):
        from .export import onnx_info

        info, format_info = onnx_info.describe_onnx(file), onnx_info.format_onnx
    elif file.endswith(".binaryproto"):
        from .formats.caffemodel import load_blob

        info, format_info = report.describe_blob(load_blob(file, schema)), report.format_blob
    elif file.endswith(".solverstate"):
        from .formats.caffemodel import load_solverstate

        info, format_info = report.describe_solverstate(load_solverstate(file, schema)), report.format_solverstate
    elif files.is_binary(head):
        from .formats.caffemodel import load_model

        info, format_info = report.describe_model(load_model(file, schema)), report.format_model
    else:
        data = files.read_bytes(file)
        files.require_text(data, file)
        kind, fields = files.read_fields(data, file, schema)
        if kind == files.SOLVER:
            info, format_info = report.describe_solver(files.parse_text(data, file, schema).message), report.format_solver
        else:
            # Read a layer at a time: a big net's tree and message would be most of the memory and time.
            shapes = input_shapes()
            net_report = report.describe_text(fields, data, file, schema, shapes)
            if net_report is None:  # a legacy net: described as Caffe upgrades it
                from .formats.upgrade import current_net

                net_report = report.describe_net(current_net(files.parse_text(data, file, schema).message, file),
                                                 shapes)
            info, format_info = net_report, report.format_net
    return info, format_info


def diff_files(file_a: str, file_b: str, schema: Schema) -> List[Any]:
    """How net (or solver) ``file_b`` differs from ``file_a``, layer by layer."""
    from .formats import files
    from .net import diff

    return diff.diff_files(files.load_text(file_a, schema), files.load_text(file_b, schema))


def format_changes(changes: List[Any]) -> str:
    from .net import diff

    return diff.format_changes(changes)


def run_plain(argv: Sequence[str]) -> Optional[int]:
    """Run ``argv`` when it is the plainest form of a read-only command (``fmt
    FILE``, ``inspect FILE``, ``diff A B``: no option, no ``-`` anywhere), and
    return its exit status; None for anything else, and for a run that failed
    with a caffe-ft error: the caller then runs the command line through click,
    which gives the usage, the help and the errors (the failed run has printed
    nothing: these commands print only once all their work is done)."""
    from .errors import CaffeFtError

    if not argv or any(arg.startswith("-") for arg in argv):
        return None
    command, args = argv[0], list(argv[1:])
    if (command, len(args)) not in (("fmt", 1), ("inspect", 1), ("diff", 2)):
        return None
    from .formats.gcpause import paused
    from .formats.schema import load_schema

    try:
        with paused():  # as the click group does for the commands that build big trees
            schema = load_schema()  # --proto's default: $CAFFE_FT_PROTO, else ours
            if command == "fmt":
                text = format_files(args, schema)[0][2]
                code = 0
            elif command == "inspect":
                info, format_info = describe_file(args[0], dict, schema)
                text, code = format_info(info), 0
            else:
                changes = diff_files(args[0], args[1], schema)
                text, code = format_changes(changes), 1 if changes else 0
    except CaffeFtError:
        return None
    except (KeyboardInterrupt, EOFError):  # what click and cli's group make of them
        sys.stderr.write("\ncaffe-ft: aborted\n")
        return 1
    try:
        emit(text)
    except BrokenPipeError:
        return 1
    return code
