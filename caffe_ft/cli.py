"""The ``caffe-ft`` command line: parse options, call the library, write.

No logic lives here.  Every :class:`CaffeFtError` becomes one line on stderr
and exit status 2; nothing is written when a command fails.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, List, Optional

import click

from . import __version__
from .errors import CaffeFtError
from .schema import PROTO_ENV, Schema, load_schema


class _Group(click.Group):
    """Turns caffe-ft errors into a one-line message and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CaffeFtError as exc:
            click.echo(f"caffe-ft: error: {exc}", err=True)
            ctx.exit(2)
        except BrokenPipeError:
            ctx.exit(1)


def _schema(ctx: click.Context) -> Schema:
    return load_schema(ctx.obj.get("proto"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="caffe-ft")
@click.option(
    "--proto",
    metavar="PATH",
    envvar=PROTO_ENV,
    help=f"caffe.proto of a Caffe fork to read files with (default: BVLC Caffe 1.0's; also ${PROTO_ENV}).",
)
@click.pass_context
def main(ctx: click.Context, proto: Optional[str]) -> None:
    """Fine-tune Caffe models: rewrite nets and solvers, check weights, train."""
    ctx.ensure_object(dict)
    ctx.obj["proto"] = proto


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 and list the files that would change.")
@click.option("--in-place", "in_place", is_flag=True, help="Rewrite the files instead of printing them.")
@click.pass_context
def fmt(ctx: click.Context, files: List[str], check: bool, in_place: bool) -> None:
    """Lay prototxt FILEs out as Caffe's own tools print them, comments kept."""
    from .fmt import format_text
    from .io import load_text, write_atomic

    if check and in_place:
        raise click.UsageError("--check and --in-place exclude each other")
    if len(files) > 1 and not (check or in_place):
        raise click.UsageError("several files need --check or --in-place")
    schema = _schema(ctx)
    # Parse everything first, so one bad file means nothing is written.
    results = []
    for path in files:
        parsed = load_text(path, schema)
        results.append((path, parsed.data, format_text(parsed)))
    changed = [path for path, data, text in results if text.encode("utf-8") != data]
    if check:
        for path in changed:
            click.echo(f"would reformat {path}")
        ctx.exit(1 if changed else 0)
    if in_place:
        for path, data, text in results:
            if path in changed:
                write_atomic(path, text)
        return
    _emit(results[0][2])


@main.command()
@click.argument("file", metavar="FILE")
@click.option("-o", "--output", metavar="OUT", help="Where to write (default: print text to stdout).")
@click.option("--in-place", "in_place", is_flag=True, help="Overwrite FILE with the upgraded version.")
@click.pass_context
def upgrade(ctx: click.Context, file: str, output: Optional[str], in_place: bool) -> None:
    """Upgrade a legacy net, solver or caffemodel to the current format.

    Does what Caffe's upgrade_net_proto_text / upgrade_solver_proto_text do
    (V0/V1 layers, input fields, old BatchNorm, solver_type) and keeps comments.
    """
    from . import io

    if in_place and output:
        raise click.UsageError("-o and --in-place exclude each other")
    target = file if in_place else output
    if target is not None and not in_place and _same_file(target, file):
        raise CaffeFtError("-o names the input file; use --in-place to overwrite it", file)
    schema = _schema(ctx)
    data = io.read_bytes(file)
    if io.is_binary(data):
        from .caffemodel import load_model, save_model
        from .upgrade import upgrade_model

        if target is None:
            raise click.UsageError("a caffemodel needs -o OUT (or --in-place)")
        model = load_model(file, schema)
        for note in upgrade_model(model):
            click.echo(note, err=True)
        save_model(model, target)
        return
    from .fmt import upgrade_text

    text, notes = upgrade_text(io.parse_text(data, file, schema))
    for note in notes:
        click.echo(note, err=True)
    if target is None:
        _emit(text)
    else:
        io.write_atomic(target, text)


def _same_file(a: str, b: str) -> bool:
    import os

    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


@main.command()
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def inspect(ctx: click.Context, file: str, as_json: bool) -> None:
    """Show what a net, solver or caffemodel holds.

    A net: its layers (bottoms -> tops, phase, lr/decay multipliers, learnable)
    and classifier head(s).  A solver: every setting, defaults shown.  A
    caffemodel: layers, blob shapes, parameter counts and size.
    """
    from . import io, summary

    schema = _schema(ctx)
    data = io.read_bytes(file)
    describe: Callable[..., Any]
    if io.is_binary(data):
        from .caffemodel import load_model

        info = summary.describe_model(load_model(file, schema))
        fmt_text = summary.format_model
    else:
        parsed = io.parse_text(data, file, schema)
        if parsed.kind == io.SOLVER:
            info, fmt_text = summary.describe_solver(parsed.message), summary.format_solver
        else:
            net = _current(parsed.message, file)
            info, fmt_text = summary.describe_net(net), summary.format_net
    if as_json:
        _emit(json.dumps(info, indent=2, sort_keys=False) + "\n")
    else:
        _emit(fmt_text(info))


def _current(net: Any, path: str) -> Any:
    """``net`` in the current format (legacy nets are upgraded on a copy)."""
    from .upgrade import net_needs_upgrade, upgrade_net

    if not net_needs_upgrade(net):
        return net
    copy = type(net)()
    copy.CopyFrom(net)
    try:
        upgrade_net(copy)
    except CaffeFtError as exc:
        raise exc.located(path) from None
    return copy


if __name__ == "__main__":  # pragma: no cover
    main()
