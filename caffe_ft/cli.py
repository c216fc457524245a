"""The ``caffe-ft`` command line: parse options, call the library, write.

Each command turns its options into the library's typed options, calls
:mod:`caffe_ft.api` (or the module that does the job) and prints the result.
Every :class:`CaffeFtError` becomes one line on stderr and exit status 2;
nothing is written when a command fails.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import click

from .version import __version__
from .errors import CaffeFtError
from .formats.schema import PROTO_ENV, Schema, load_schema


# Commands that build big parse trees and messages and end: no cyclic garbage
# collection while they run (see formats/gcpause.py).  Training commands keep it.
_TREE_COMMANDS = frozenset({"fmt", "upgrade", "inspect", "diff", "rewrite", "check", "init"})


class _Group(click.Group):
    """Turns caffe-ft errors, and click's own usage errors, into one line
    (``caffe-ft: error: ...``) and exit status 2."""

    def main(self, args: Any = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = " ".join(["caffe-ft", *(exc.ctx.command_path.split()[1:] if exc.ctx is not None else [])])
            message = " ".join(exc.format_message().split())  # one line, whatever click's layout
            click.echo(f"caffe-ft: error: {message} (see '{where} --help')", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"caffe-ft: error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except click.Abort:
            click.echo("caffe-ft: aborted", err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CaffeFtError as exc:
            click.echo(f"caffe-ft: error: {exc}", err=True)
            ctx.exit(2)
        except BrokenPipeError:
            ctx.exit(1)


class _Number(click.ParamType):
    """A finite float, optionally above a bound: inf, nan and out-of-range values
    are refused at the edge with a one-line error (Caffe would read them, and
    train on garbage)."""

    name = "number"

    def __init__(self, above: Optional[float] = None, at_least: Optional[float] = None) -> None:
        self.above, self.at_least = above, at_least

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        option = param.opts[0] if param is not None and param.opts else "value"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CaffeFtError(f"{option}: {value!r} is not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise CaffeFtError(f"{option}: {value!r} is not a finite number")
        if self.above is not None and not number > self.above:
            raise CaffeFtError(f"{option}: {value!r} must be greater than {self.above:g}")
        if self.at_least is not None and not number >= self.at_least:
            raise CaffeFtError(f"{option}: {value!r} must be at least {self.at_least:g}")
        return number


_FINITE, _POSITIVE, _NON_NEGATIVE = _Number(), _Number(above=0), _Number(at_least=0)


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
    if ctx.invoked_subcommand in _TREE_COMMANDS:
        from contextlib import ExitStack

        from .formats.gcpause import paused

        pause = ExitStack()
        pause.enter_context(paused())
        ctx.call_on_close(pause.close)  # when the command ends (click 7 has no with_resource)


def _json(value: Any) -> str:
    """``value`` as JSON (indented, one trailing newline); non-finite numbers,
    which JSON cannot hold, become the strings "nan", "inf" and "-inf"."""
    import json

    from .net.report import json_safe

    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"


def _emit(text: str) -> None:
    from .commands import emit

    emit(text)


@main.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 and list the files that would change.")
@click.option("--in-place", "in_place", is_flag=True, help="Rewrite the files instead of printing them.")
@click.pass_context
def fmt(ctx: click.Context, files: List[str], check: bool, in_place: bool) -> None:
    """Lay prototxt FILEs out as Caffe's own tools print them, comments kept."""
    from .commands import format_files
    from .formats.files import write_atomic

    if check and in_place:
        raise click.UsageError("--check and --in-place exclude each other")
    if len(files) > 1 and not (check or in_place):
        raise click.UsageError("several files need --check or --in-place")
    results = format_files(files, _schema(ctx))  # every file parsed first: one bad file means nothing is written
    changed = [path for path, data, text in results if text.encode("utf-8", "surrogateescape") != data]
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
@click.option("--force", is_flag=True, help="Overwrite an existing OUT.")
@click.pass_context
def upgrade(ctx: click.Context, file: str, output: Optional[str], in_place: bool, force: bool) -> None:
    """Upgrade a legacy net, solver or caffemodel to the current format.

    Does what Caffe's upgrade_net_proto_text / upgrade_solver_proto_text do
    (V0/V1 layers, input fields, old BatchNorm, solver_type) and keeps comments.
    """
    from .formats import files

    if in_place and output:
        raise click.UsageError("-o and --in-place exclude each other")
    target = file if in_place else output
    if target is not None and not in_place:
        _check_output(ctx, target, [file], force, instead="use --in-place to overwrite it")
    schema = _schema(ctx)
    if files.is_binary(files.read_head(file)):
        from .formats.caffemodel import load_model, save_model, upgrade_model

        if target is None:
            raise click.UsageError("a caffemodel needs -o OUT (or --in-place)")
        model = load_model(file, schema)
        for note in upgrade_model(model):
            click.echo(note, err=True)
        save_model(model, target)
        return
    from .formats.layout import upgrade_text

    text, notes = upgrade_text(files.parse_text(files.read_bytes(file), file, schema))
    for note in notes:
        click.echo(note, err=True)
    if target is None:
        _emit(text)
    else:
        files.write_atomic(target, text)


def _check_output(ctx: click.Context, target: Optional[str], inputs: List[Optional[str]], force: bool = False,
                  option: str = "-o", instead: str = "write elsewhere") -> None:
    """The output policy for one file: never an input (nor --proto), existing only with --force."""
    from .formats.files import check_output

    if target is not None:
        check_output(target, [*inputs, ctx.obj.get("proto")], force, option, instead)


def _input_shapes(values: Any) -> Dict[str, Tuple[int, ...]]:
    """``--input-shape data=1,3,224,224`` options as a dict."""
    shapes = {}
    for value in values:
        name, _, dims = value.partition("=")
        try:
            shapes[name] = tuple(int(dim) for dim in dims.split(","))
        except ValueError:
            raise click.BadParameter(f"expected TOP=N,C,H,W, got {value!r}", param_hint="--input-shape") from None
        if not name or not shapes[name]:
            raise click.BadParameter(f"expected TOP=N,C,H,W, got {value!r}", param_hint="--input-shape")
    return shapes


@main.command()
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="TOP=N,C,H,W",
              help="Shape of a data layer's top when its parameters do not tell (repeatable).")
@click.pass_context
def inspect(ctx: click.Context, file: str, as_json: bool, input_shapes: Any) -> None:
    """Show what a net, solver or caffemodel holds.

    A net: its layers (bottoms -> tops, phase, lr/decay multipliers, learnable,
    inferred output and parameter shapes, parameter counts, multiply-adds)
    and classifier head(s).  A solver: every setting, defaults shown.  A
    caffemodel: layers, blob shapes, parameter counts and size.  A mean file
    (.binaryproto): its shape and per-channel means.  A .solverstate: the
    iteration and the history blobs.  An .onnx model: inputs, outputs, opset, size.
    """
    from .commands import describe_file

    schema = _schema(ctx)
    info, format_info = describe_file(file, lambda: _input_shapes(input_shapes), schema)
    if as_json:
        from .net.report import as_json as json_data

        _emit(_json(json_data(info)))
    else:
        _emit(format_info(info))


def _option_group(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator for click options that several commands share, listed in
    ``--help`` in the order given."""

    def decorate(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _rewrite_options(strategy_default: Optional[str] = None) -> Callable[[Any], Any]:
    """The options ``rewrite`` and ``finetune`` share: strategy, head, data, solver."""
    strategy_help = ("What trains: only the classifier head(s), the top of the net, or all of it; "
                     "features: last-fc's net, whose head finetune fits with scikit-learn on cached features; "
                     "lp-ft: fit the head on cached features (a linear probe), then fine-tune (--then) from it; "
                     "auto picks by data set size and similarity.")
    options = [
        click.option("--strategy", type=click.Choice(["last-fc", "top", "full", "features", "lp-ft", "auto"]),
                     help=strategy_help,
                     # click 8.3+ takes an explicit default=None as a default that satisfies required
                     **({"required": True} if strategy_default is None
                        else {"default": strategy_default, "show_default": True})),
        click.option("--num-classes", type=click.IntRange(min=2),
                     help="Classes of the new task (default: the labels of --train-data, 0..K-1; "
                          "without data the heads keep their num_output)."),
        click.option("--solver", "solver_path", metavar="SOLVER", help="Solver to rewrite (learning rate, steps, paths)."),
        click.option("--deploy", "deploy_path", metavar="DEPLOY",
                     help="The matching deploy net, rewritten alongside (default: derived from NET)."),
        click.option("-o", "--outdir", metavar="OUTDIR", help="Output directory (default: ft-STRATEGY beside NET)."),
        click.option("--head", "heads", multiple=True, metavar="LAYER",
                     help="Classifier head layer (repeatable; default: detected)."),
        click.option("--new-name", metavar="NAME", help="New name of the (single) head (default: OLD_ft)."),
        click.option("--head-lr-mult", type=_NON_NEGATIVE, default=10.0, show_default=True,
                     help="lr_mult of the new head's weights; its bias gets twice this."),
        click.option("--frozen-lr-mult", type=_NON_NEGATIVE, default=0.0, show_default=True,
                     help="lr_mult of frozen layers (e.g. 0.001 for 'very low' instead of frozen)."),
        click.option("--freeze-until", metavar="LAYER", help="top: freeze this layer and all before it."),
        click.option("--then", type=click.Choice(["full", "top"]), default="full", show_default=True,
                     help="lp-ft: how the net is fine-tuned after the probe (top needs --train-last or "
                          "--freeze-until)."),
        click.option("--class-weights", metavar="auto|FILE",
                     help="Weight each class's loss: auto (N / (K n_k) from --train-data's labels) or a file with "
                          "one weight per line; an InfogainLoss with a diagonal H (class_weights.binaryproto)."),
        click.option("--layer-decay", type=_POSITIVE, metavar="F",
                     help="Layer-wise lr decay: each training layer (a residual/inception block) below the heads "
                          "learns F times as fast as the one above; frozen layers stay frozen."),
        click.option("--train-last", type=click.IntRange(min=1), metavar="K", help="top: train the last K learnable layers."),
        click.option("--dataset-size", type=click.IntRange(min=1), metavar="N",
                     help="auto: training examples (default: lines of --train-data)."),
        click.option("--similarity", type=click.Choice(["high", "low"]),
                     help="auto: how close the data is to the pretraining data (default: take caffe-ft "
                     "advise's measured recommendation, with --weights)."),
        click.option("--train-data", metavar="SRC",
                     help="Training data: an image list (.txt, 'path label' lines) or an LMDB directory."),
        click.option("--val-data", metavar="SRC", help="Validation data, as --train-data."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--val-batch-size", type=click.IntRange(min=1), default=50, show_default=True),
        click.option("--crop-size", type=click.IntRange(min=1), help="Crop size (default: the net's input size)."),
        click.option("--resize", type=click.IntRange(min=1),
                     help="ImageData: resize images to this square size before cropping."),
        click.option("--mean-value", "mean_values", type=_FINITE, multiple=True,
                     help="Per-channel mean (repeat per channel)."),
        click.option("--mean-file", metavar="BINARYPROTO", help="Mean image file."),
        click.option("--scale", type=_POSITIVE, help="Multiply pixels by this after mean subtraction."),
        click.option("--mirror/--no-mirror", default=None, help="Random horizontal flips while training."),
        click.option("--root-folder", metavar="DIR", help="ImageData: directory the image list's paths are relative to."),
        click.option("--lr-scale", type=_POSITIVE, default=0.1, show_default=True, help="base_lr is multiplied by this."),
        click.option("--step-scale", type=_POSITIVE, default=0.2, show_default=True,
                     help="Without --train-data (run length unknown): stepsize/stepvalue/max_iter are multiplied by this."),
        click.option("--max-iter", type=click.IntRange(min=1), help="max_iter of the new solver (instead of epochs)."),
        click.option("--epochs", type=click.IntRange(min=1), metavar="N",
                     help="Passes over --train-data the run makes (default: by strategy and data set size)."),
        click.option("--gray/--color", "gray", default=None,
                     help="Grey (1-channel) or colour (3-channel) input (default: the net's, else the data's)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="TOP=N,C,H,W",
                     help="Shape of a data layer's top when neither its parameters nor its data tell "
                          "(the deploy net's input; with --weights, the check's); repeatable."),
    ]
    return _option_group(*options)


def _options_of(params: Dict[str, Any]) -> Any:
    """The typed options of ``rewrite``/``finetune`` from the shared command-line options."""
    from .recipe.options import RewriteOptions
    from .recipe.rewrite import DataOptions, SolverOptions
    from .recipe.strategies import StrategyOptions

    head = StrategyOptions(
        num_classes=params["num_classes"], heads=tuple(params["heads"]), new_name=params["new_name"],
        head_lr_mult=params["head_lr_mult"], frozen_lr_mult=params["frozen_lr_mult"],
        freeze_until=params["freeze_until"], train_last=params["train_last"], layer_decay=params["layer_decay"],
    )
    data = DataOptions(
        train=params["train_data"], val=params["val_data"], batch_size=params["batch_size"],
        val_batch_size=params["val_batch_size"], crop_size=params["crop_size"], resize=params["resize"],
        mean_values=tuple(params["mean_values"]), mean_file=params["mean_file"], scale=params["scale"],
        mirror=params["mirror"], root_folder=params["root_folder"],
        channels=None if params["gray"] is None else (1 if params["gray"] else 3),
    )
    solver = SolverOptions(lr_scale=params["lr_scale"], step_scale=params["step_scale"], max_iter=params["max_iter"],
                           epochs=params["epochs"])
    return RewriteOptions(
        head, strategy=params["strategy"], data=data, solver=solver, solver_path=params["solver_path"],
        deploy_path=params["deploy_path"], outdir=params["outdir"], dataset_size=params["dataset_size"],
        similarity=params["similarity"], input_shapes=_input_shapes(params["input_shapes"]),
        class_weights=params["class_weights"], then=params["then"],
    )


def _usage_errors(call: Callable[[], Any]) -> Any:
    """``call()``, with the library's option conflicts shown as click usage errors."""
    from .recipe.planning import OptionError

    try:
        return call()
    except OptionError as exc:
        raise click.UsageError(exc.message) from None


@main.command()
@click.argument("net_path", metavar="NET")
@_rewrite_options()
@click.option("--weights", metavar="MODEL",
              help="Pretrained caffemodel: check which weights the new net copies, and refuse a net Caffe would reject.")
@click.option("--diff", "show_diff", is_flag=True, help="Print the changes as a unified diff.")
@click.option("--dry-run", is_flag=True, help="Write nothing.")
@click.option("--force", is_flag=True, help="Overwrite existing files in OUTDIR (never an input).")
@click.pass_context
def rewrite(ctx: click.Context, net_path: str, weights: Optional[str], show_diff: bool, dry_run: bool, force: bool,
            **params: Any) -> None:
    """Turn a pretrained NET (train_val or deploy) into a fine-tuning setup.

    Writes train_val.prototxt, deploy.prototxt, solver.prototxt and summary.md
    to OUTDIR, each an edit of its input that keeps comments and layout.
    """
    from . import api
    from .recipe.rewrite import summary_text, unified_diff, write_plan

    options = _options_of(params)
    result = _usage_errors(lambda: api.rewrite(net_path, options, weights=weights, write=False,
                                               schema=_schema(ctx), out=sys.stderr))
    if show_diff:
        _emit(unified_diff(result))
    if dry_run:
        return
    write_plan(result, force=force, inputs=_plan_inputs(ctx, weights, params))
    _emit(summary_text(result))


#: ``--keep-best`` and ``--patience``, which ``train`` and ``finetune`` share.
_keep_best = _option_group(
    click.option("--keep-best", "keep_best", metavar="OUTPUT",
                 help="Write best.caffemodel at each test where this output of the first test net is the best "
                      "yet (accuracy is maximised, an output named *loss* minimised)."),
    click.option("--patience", type=click.IntRange(min=1), metavar="N",
                 help="With --keep-best: stop after N tests in a row without a better value."),
)


def _engine_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--engine pycaffe|torch|auto`` for a command that runs nets (``what`` says for what)."""
    return click.option("--engine", type=click.Choice(["pycaffe", "torch", "auto"]), default="pycaffe",
                        show_default=True, help=f"Who {what}: pycaffe, PyTorch with Caffe's semantics, or auto "
                        "(pycaffe where it can run on the device, else torch).")


def _data_workers_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--data-workers N`` (torch engine) for a command that trains."""
    return click.option("--data-workers", type=click.IntRange(min=0), metavar="N",
                        help="Torch engine: processes that read, decode and transform each net's data "
                        "(0: in the training process; default: one fewer than the cores, 1 to 3).")(function)


def _chosen_engine(engine: str, device: str) -> str:
    """The engine ``--engine`` asks for on ``device``; for ``auto``, say which was picked and why."""
    from .training.run import choose_engine

    chosen, why = choose_engine(engine, device)
    if engine == "auto":
        click.echo(f"engine: {chosen} ({why})", err=True)
    return chosen


@main.command()
@click.argument("net_path", metavar="NET")
@click.option("--weights", required=True, metavar="MODEL", help="Pretrained caffemodel to start from.")
@_rewrite_options(strategy_default="auto")
@click.option("--gpu", metavar="IDS", help="GPU(s) to train on: 0, 0,1 or all (several use NCCL).")
@click.option("--cpu", is_flag=True, help="Train on the CPU whatever the solver says.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fresh head's initial weights.")
@click.option("--force", is_flag=True, help="Overwrite existing files in OUTDIR.")
@click.option("--cached-features/--no-cached-features", "cached", default=True, show_default=True,
              help="last-fc: train the head on cached features when that gives what pycaffe would "
                   "(deterministic input, SGD); off: always train with pycaffe.")
@click.option("--resume", metavar="STATE", help="Continue a stopped job from its .solverstate (the command it "
              "printed when stopped).")
@_keep_best
@click.option("--export-onnx", is_flag=True, help="Also write final.onnx (the deploy net, final weights), "
              "checked against pycaffe.")
@_engine_option("trains and computes cached features")
@_data_workers_option
@click.pass_context
def finetune(ctx: click.Context, net_path: str, weights: str, gpu: Optional[str], cpu: bool, seed: int,
             force: bool, cached: bool, resume: Optional[str], keep_best: Optional[str], patience: Optional[int],
             export_onnx: bool, engine: str, data_workers: Optional[int], **params: Any) -> None:
    """Fine-tune NET from WEIGHTS on new data: rewrite + check + init + train.

    OUTDIR receives the prototxts, init.caffemodel, Caffe's snapshots,
    final.caffemodel, metrics.jsonl, plot.png, report.html/report.json and summary.md (final accuracy,
    time); with --export-onnx also final.onnx.  --strategy features fits the head with scikit-learn on features
    the trunk computes once (features-train.npz, features-val.npz, reused
    while up to date); last-fc does the solver's SGD on such features when
    the input is deterministic, and says so.
    """
    from . import api
    from .recipe.options import FinetuneOptions

    if gpu is not None and cpu:
        raise click.UsageError("--gpu and --cpu exclude each other")
    device = "cpu" if cpu else (gpu if gpu is not None else "solver")
    chosen = _chosen_engine(engine, device)
    if chosen == "pycaffe" and data_workers is not None:
        raise click.UsageError("--data-workers needs --engine torch")
    options = FinetuneOptions(_options_of(params), device=device, seed=seed, force=force, cached=cached,
                              resume=resume, keep_best=keep_best, patience=patience, export_onnx=export_onnx,
                              engine=chosen, data_workers=data_workers)
    outcome = _usage_errors(lambda: api.finetune(net_path, weights, options, schema=_schema(ctx), out=sys.stderr))
    results = ", ".join(f"{name} {value:.4f}" for name, value in sorted(outcome.test_outputs.items()))
    tested = "the final weights' test" if outcome.final_model else "the last test"
    _emit(f"{outcome.outdir}: {outcome.message}; {tested}: {results or 'no test outputs'}; "
          f"{outcome.seconds:.1f} s\n")
    if outcome.resume_state:
        click.echo(f"resume with: {_resume_command(outcome.resume_state)}", err=True)
    ctx.exit(outcome.exit_code)


def _plan_inputs(ctx: click.Context, weights: Optional[str], params: Dict[str, Any]) -> List[Optional[str]]:
    """Files a rewrite reads besides the nets: none of them may be overwritten."""
    return [weights, params.get("train_data"), params.get("val_data"), params.get("mean_file"), ctx.obj.get("proto")]


def _resume_command(state: str) -> str:
    """This very command line, continuing from ``state`` (an earlier --resume replaced)."""
    import shlex

    words, skip = [], False
    for word in sys.argv[1:]:
        if skip:
            skip = False
        elif word == "--resume":
            skip = True
        elif not word.startswith("--resume="):
            words.append(word)
    return " ".join(shlex.quote(word) for word in ["caffe-ft", *words, "--resume", state])


@main.command()
@click.argument("file_a", metavar="A")
@click.argument("file_b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
@click.pass_context
def diff(ctx: click.Context, file_a: str, file_b: str, as_json: bool) -> None:
    """Show how net (or solver) B differs from A, layer by layer.

    Layers are matched by name; a layer replaced by one of the same type at
    the same place counts as renamed.  Comments, layout and values set to
    their defaults do not count.  Exit status: 0 same, 1 different, 2 error.
    """
    from .commands import diff_files, format_changes

    changes = diff_files(file_a, file_b, _schema(ctx))
    if as_json:
        from .net.diff import to_json

        _emit(_json(to_json(changes)))
    else:
        _emit(format_changes(changes))
    ctx.exit(1 if changes else 0)


_PHASE = click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False), default="TRAIN",
                      show_default=True, help="Net state to build (caffe train copies into TRAIN, then each TEST net).")
_INPUT_SHAPE = click.option("--input-shape", "input_shapes", multiple=True, metavar="TOP=N,C,H,W",
                            help="Shape of a data layer's top the net does not give (Data, HDF5Data...); repeatable.")


@main.command()
@click.argument("net_path", metavar="NET")
@click.option("--weights", required=True, metavar="MODEL", help="The pretrained caffemodel.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_PHASE
@_INPUT_SHAPE
@click.pass_context
def check(ctx: click.Context, net_path: str, weights: str, as_json: bool, phase: str, input_shapes: Any) -> None:
    """Say which layers of NET Caffe would copy from MODEL, which start fresh, and whether it aborts.

    Exit 0 when training would start, 1 when Caffe would abort.
    """
    from . import api
    from .net.weights import format_check

    report = api.check(net_path, weights, phase=phase, input_shapes=_input_shapes(input_shapes),
                       schema=_schema(ctx))
    _emit(_json(report.to_dict()) if as_json else format_check(report))
    ctx.exit(0 if report.usable else 1)


@main.command()
@click.argument("net_path", metavar="NET")
@click.option("--weights", required=True, metavar="MODEL", help="The pretrained caffemodel.")
@click.option("-o", "--output", required=True, metavar="OUT", help="The caffemodel to write (never MODEL).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fresh layers' random values.")
@click.option("--force", is_flag=True, help="Overwrite an existing OUT.")
@_PHASE
@_INPUT_SHAPE
@click.pass_context
def init(ctx: click.Context, net_path: str, weights: str, output: str, seed: int, force: bool, phase: str,
         input_shapes: Any) -> None:
    """Write the caffemodel NET starts from: MODEL's blobs where they fit, fillers elsewhere.

    Refuses when Caffe would abort (run `caffe-ft check` to see why).
    """
    from . import api
    from .net import weights as wt

    _check_output(ctx, output, [net_path, weights], force)  # --proto too
    report = api.init(net_path, weights, output, seed=seed, phase=phase, input_shapes=_input_shapes(input_shapes),
                      schema=_schema(ctx), force=force)
    for layer in report.by_status(wt.FRESH):
        if layer.likely_typo:
            click.echo(f"warning: layer '{layer.name}' starts fresh: {layer.reason}", err=True)
    copied, fresh = (len(report.by_status(status)) for status in (wt.COPIED, wt.FRESH))
    _emit(f"wrote {output}: {copied} layers copied, {fresh} filled fresh (seed {seed})\n")


@main.command()
@click.argument("net_path", metavar="NET")
@click.option("--weights", metavar="MODEL", help="The net's caffemodel (needed when it has learnable layers).")
@click.option("-o", "--output", required=True, metavar="OUT.onnx", help="The ONNX model to write.")
@click.option("--opset", type=click.IntRange(min=13), default=13, show_default=True, help="ONNX opset to target.")
@_INPUT_SHAPE
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True,
              help="Leave the batch axis symbolic (N), or fix it at the net's batch size.")
@click.option("--softmax/--logits", default=None,
              help="Add a Softmax to each score output, or strip the output Softmax (default: as the net says).")
@click.option("--force", is_flag=True, help="Overwrite OUT.onnx if it exists.")
@click.pass_context
def export(ctx: click.Context, net_path: str, weights: Optional[str], output: str, opset: int, input_shapes: Any,
           dynamic_batch: bool, softmax: Optional[bool], force: bool) -> None:
    """Write NET and its weights as an ONNX model that computes what Caffe computes.

    A train_val net is exported as its deploy net (data, loss and accuracy
    layers replaced by an Input layer).  Nothing is written when a layer has
    no faithful ONNX equivalent.
    """
    from . import api
    from .export import to_onnx

    _check_output(ctx, output, [net_path, weights], force)  # --proto too
    options = to_onnx.ExportOptions(opset, _input_shapes(input_shapes), dynamic_batch, softmax)
    result = api.export_onnx(net_path, weights, output, options, force=force, schema=_schema(ctx), out=sys.stderr)
    _emit(to_onnx.summary(result, output))


#: Options that override the data transform the net's data layer describes.
_transform_options = _option_group(
    click.option("--root-folder", metavar="DIR", help="Directory the image list's paths are relative to "
                 "(default: the net's image_data_param.root_folder)."),
    click.option("--crop-size", type=click.IntRange(min=1), help="Centre crop (default: the net's transform_param)."),
    click.option("--resize", type=click.IntRange(min=1), metavar="SIZE",
                 help="Resize images to SIZE x SIZE first (default: ImageData's new_height/new_width; "
                      "a deploy net: its input size)."),
    click.option("--mean-value", "mean_values", type=_FINITE, multiple=True,
                 help="Per-channel mean, BGR (repeat per channel)."),
    click.option("--mean-file", metavar="BINARYPROTO", help="Mean image file."),
    click.option("--scale", type=_POSITIVE, help="Multiply pixels by this after mean subtraction."),
)


def _transform_overrides(crop_size: Optional[int], resize: Optional[int], mean_values: Any,
                         mean_file: Optional[str], scale: Optional[float]) -> dict:
    return {"crop_size": crop_size, "new_height": resize, "new_width": resize,
            "mean_values": tuple(mean_values) or None, "mean_file": mean_file, "scale": scale}


@main.command()
@click.argument("net_path", metavar="NET")
@click.option("--weights", required=True, metavar="MODEL", help="Pretrained caffemodel.")
@click.option("--data", required=True, metavar="SRC", help="An image list ('path label' lines) or an LMDB directory.")
@click.option("--layer", metavar="LAYER", help="Layer (or blob) whose output is the feature "
              "(default: the input of the classifier head).")
@click.option("-o", "--output", required=True, metavar="FEATURES.npz", help="Features file (reused while up to date).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--force", is_flag=True, help="Recompute even when the features file is up to date.")
@_transform_options
@_engine_option("runs the trunk (torch: on the first GPU when there is one)")
@click.pass_context
def features(ctx: click.Context, net_path: str, weights: str, data: str, layer: Optional[str], output: str,
             batch_size: int, force: bool, root_folder: Optional[str], crop_size: Optional[int],
             resize: Optional[int], mean_values: Any, mean_file: Optional[str], scale: Optional[float],
             engine: str) -> None:
    """Run the frozen trunk of NET once over the data and cache its features.

    The net is cut after LAYER, images are transformed as the net's TEST data
    layer does, and the features, labels and fingerprints of the net, weights,
    data and transform go to a compressed .npz; a file that is still up to
    date is reused.
    """
    from .heads.cache import Request, compute_or_reuse

    _check_output(ctx, output, [net_path, weights, data, mean_file], force=True)
    request = Request(net_path, weights, data, layer, root_folder,
                      _transform_overrides(crop_size, resize, mean_values, mean_file, scale), batch_size,
                      engine=_chosen_engine(engine, "cpu"))
    outcome = compute_or_reuse(request, output, _schema(ctx), force=force)
    result = outcome.features
    verb = "reused" if outcome.reused else f"computed ({outcome.reason})"
    _emit(f"{output}: {verb}: {len(result.labels)} examples, feature '{result.meta['blob']}' "
          f"{'x'.join(map(str, result.features.shape[1:]))}\n")


@main.command()
@click.argument("features_path", metavar="FEATURES")
@click.option("--num-classes", type=click.IntRange(min=2), required=True, help="Classes of the new head.")
@click.option("-o", "--outdir", required=True, metavar="OUTDIR",
              help="Where deploy.prototxt, linear.caffemodel and linear.json go.")
@click.option("--classifier", type=click.Choice(["logreg", "svm"]), default="logreg", show_default=True,
              help="Multinomial logistic regression (a Softmax head) or a linear SVM (scores).")
@click.option("--C", "c_values", metavar="VALUES", help="Comma-separated C values to cross-validate "
              "(one value: no cross-validation; default: a decade grid).")
@click.option("--val", "val_path", metavar="FEATURES", help="Validation features (default: hold out --val-fraction).")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True)
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="Cross-validation folds.")
@click.option("--net", "net_path", metavar="NET", help="Net the features came from (default: as recorded).")
@click.option("--weights", metavar="MODEL", help="Its caffemodel (default: as recorded).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing files in OUTDIR.")
@click.pass_context
def linear(ctx: click.Context, features_path: str, num_classes: int, outdir: str, classifier: str,
           c_values: Optional[str], val_path: Optional[str], val_fraction: float, folds: int,
           net_path: Optional[str], weights: Optional[str], seed: int, force: bool) -> None:
    """Train a linear classifier on cached FEATURES and write it as a Caffe head.

    C is picked by stratified cross-validation; the validation accuracy is
    reported; the standardization is folded into the InnerProduct weights of
    a deploy net (trunk + head) and its caffemodel.
    """
    from .heads import linear as lin
    from .heads.cache import load_features, stale_parts

    train = load_features(features_path)
    val = load_features(val_path) if val_path else None
    if val is not None:
        stale = stale_parts({k: v for k, v in train.meta["fingerprints"].items() if k != "data"},
                               {k: v for k, v in val.meta["fingerprints"].items() if k != "data"})
        if stale:
            raise CaffeFtError(f"the validation features come from another trunk ({', '.join(stale)} differ)", val_path)
    try:
        result = lin.fit(train, num_classes, classifier, lin.parse_cs(c_values) if c_values else None,
                         val, val_fraction, folds, seed)
    except CaffeFtError as exc:
        raise exc.located(features_path) from None
    head = lin.write_head(_schema(ctx), result, train.meta, outdir, num_classes, net_path, weights, force,
                          [features_path, val_path, ctx.obj.get("proto")])
    _emit(result.report())
    _emit(f"wrote {head.deploy}, {head.weights} (head '{head.layer}', output '{head.output}'), {head.summary}\n")


@main.command()
@click.argument("net_path", metavar="NET")
@click.option("--weights", required=True, metavar="MODEL", help="Pretrained caffemodel.")
@click.option("--train-data", required=True, metavar="SRC", help="Training data: an image list or an LMDB directory.")
@click.option("--sample", type=click.IntRange(min=10), default=2000, show_default=True,
              help="Images measured at most (drawn at random from an image list; an LMDB's first records).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers, the rule and the advice as JSON.")
@click.option("--val-data", hidden=True, metavar="SRC",
              help="Accepted from earlier versions and not used: the probes cross-validate on the sample.")
@_engine_option("runs the net")
@_transform_options
@click.pass_context
def advise(ctx: click.Context, net_path: str, weights: str, train_data: str, sample: int, batch_size: int,
           as_json: bool, val_data: Optional[str], engine: str, root_folder: Optional[str], crop_size: Optional[int], resize: Optional[int],
           mean_values: Any, mean_file: Optional[str], scale: Optional[float]) -> None:
    """Recommend a fine-tuning strategy from measurements of the data.

    One forward pass of the frozen net over a sample of the training images
    gives the features at the penultimate blob and at a middle and an early
    stage output; at each, a cross-validated linear probe, a leave-one-out
    cosine kNN and LogME are measured.  The table, the rule applied and the
    finetune flags that follow are printed.
    """
    from .recipe import advise as adv

    if val_data is not None:
        click.echo("note: advise no longer reads --val-data: its probes cross-validate on the training sample",
                   err=True)
    advice = adv.advise(net_path, weights, train_data, schema=_schema(ctx), root_folder=root_folder,
                        transform=_transform_overrides(crop_size, resize, mean_values, mean_file, scale),
                        sample=sample, batch_size=batch_size, engine=_chosen_engine(engine, "cpu"))
    _emit(_json(advice.as_dict()) if as_json else advice.report())


@main.command()
@click.argument("solver", metavar="SOLVER")
@click.option("--weights", metavar="MODEL", help="Start from these weights (checked against the nets first).")
@click.option("--gpu", "gpu", metavar="IDS", help="GPU(s) to train on: 0, 0,1 or all (several use NCCL).")
@click.option("--cpu", is_flag=True, help="Train on the CPU whatever the solver's solver_mode says.")
@click.option("--resume", metavar="STATE", help="Continue from a .solverstate snapshot.")
@click.option("--metrics", metavar="FILE", help="Write per-iteration loss, lr and test outputs here (JSON lines).")
@click.option("--plot", metavar="PNG", help="Draw the loss and test outputs to this PNG at the end.")
@click.option("--snapshot-on-exit/--no-snapshot-on-exit", default=True, show_default=True,
              help="Snapshot when stopped by SIGINT/SIGTERM.")
@click.option("--caffe-log", is_flag=True, help="Show Caffe's own INFO log.")
@click.option("--report", metavar="DIR", help="Write report.html and report.json here at the end "
              "(the last snapshot evaluated on the first test net's images; needs --metrics).")
@click.option("--tensorboard", metavar="DIR", help="Also write the run's loss, learning rate and test outputs "
              "as TensorBoard event files here (tensorboardX; needs --metrics).")
@_keep_best
@click.option("--stop-after", type=click.IntRange(min=1), metavar="N", hidden=True,
              help="Act as if interrupted once N iterations are done (for testing).")
@_engine_option("trains")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="fp32", show_default=True,
              help="Torch engine on a GPU: tf32 or bf16 trade exactness for speed.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Torch engine: channels-last memory format (default: on the CPU only).")
@_data_workers_option
@click.pass_context
def train(ctx: click.Context, solver: str, weights: Optional[str], gpu: Optional[str], cpu: bool,
          resume: Optional[str], metrics: Optional[str], plot: Optional[str], snapshot_on_exit: bool,
          caffe_log: bool, report: Optional[str], tensorboard: Optional[str], stop_after: Optional[int],
          engine: str, precision: str, channels_last: Optional[bool], keep_best: Optional[str],
          patience: Optional[int], data_workers: Optional[int]) -> None:
    """Train with SOLVER through pycaffe or torch: progress, metrics, safe snapshots.

    Ctrl-C (or SIGTERM) finishes the iteration, snapshots and prints the
    command that resumes; a resumed run reads on from where the data layers
    were.  A nan/inf loss stops the run and keeps the last good state.
    Exit status: 0 done, 2 error or divergence, 130/143 interrupted.
    """
    from . import api
    from .training.run import TrainOptions

    if gpu is not None and cpu:
        raise click.UsageError("--gpu and --cpu exclude each other")
    if metrics or plot:
        inputs = [solver, weights, resume, *_solver_nets(ctx, solver)]
        _check_output(ctx, metrics, inputs, force=True, option="--metrics")
        _check_output(ctx, plot, inputs + [metrics], force=True, option="--plot")
    device = "cpu" if cpu else (gpu if gpu is not None else "solver")
    chosen = _chosen_engine(engine, device)
    if chosen == "pycaffe" and (precision != "fp32" or channels_last is not None or data_workers is not None):
        raise click.UsageError("--precision, --channels-last and --data-workers need --engine torch")
    options = TrainOptions(
        solver=solver, weights=weights, device=device,
        resume=resume, metrics=metrics, plot=plot, snapshot_on_exit=snapshot_on_exit, stop_after=stop_after,
        caffe_log=caffe_log, proto=ctx.obj.get("proto"), report=report, tensorboard=tensorboard,
        engine=engine if engine != "auto" else "pycaffe", precision=precision, channels_last=channels_last,
        keep_best=keep_best, patience=patience, data_workers=data_workers,
    )
    if chosen == "torch":
        from dataclasses import replace

        options = replace(options, engine="torch")
    result = api.train(options, schema=_schema(ctx), out=sys.stderr)
    if result.status == "diverged":
        click.echo(f"caffe-ft: error: {result.message}", err=True)
    else:
        click.echo(result.message, err=True)
    for note in result.best_notes:
        click.echo(note, err=True)
    if result.resume_command:
        click.echo(f"resume with: {result.resume_command}", err=True)
    ctx.exit(result.exit_code)


def _solver_nets(ctx: click.Context, solver: str) -> List[Optional[str]]:
    """The net files a solver names (none when it cannot be read: training says why)."""
    from .formats import files

    try:
        message = files.load_text(solver, _schema(ctx), files.SOLVER).message
    except CaffeFtError:
        return []
    return [message.net or None, message.train_net or None, *message.test_net]


@main.command()
@click.argument("metrics", metavar="METRICS")
@click.option("-o", "--output", metavar="PNG", required=True, help="Where to write the plot.")
@click.option("--title", help="Title over the plot (default: the metrics file's name).")
@click.option("--force", is_flag=True, help="Overwrite an existing PNG.")
@click.pass_context
def plot(ctx: click.Context, metrics: str, output: str, title: Optional[str], force: bool) -> None:
    """Draw the loss and test outputs of a `caffe-ft train --metrics` file to a PNG."""
    from .training.plot import plot_file

    _check_output(ctx, output, [metrics], force)

    plot_file(metrics, output, title or "")


@main.command()
@click.argument("net_path", metavar="NET")
@click.option("--weights", required=True, metavar="MODEL", help="The trained caffemodel.")
@click.option("--data", required=True, metavar="SRC", help="An image list ('path label' lines) or an LMDB directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), multiple=True, metavar="K",
              help="Also report top-K accuracy (repeatable; default: 5).")
@click.option("--blob", metavar="BLOB", help="The blob of class scores (default: what the Accuracy or loss layer "
              "reads; a deploy net: its output).")
@click.option("--class-names", metavar="FILE", help="One class name per line, in label order.")
@click.option("--mistakes", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many of the most confident mistakes to list.")
@click.option("--predictions", metavar="OUT.npz", help="Also save the probabilities, labels and sources here.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@_transform_options
@_engine_option("runs the net (torch: on the first GPU when there is one)")
@click.pass_context
def evaluate(ctx: click.Context, net_path: str, weights: str, data: str, as_json: bool, top_k: Any,
             blob: Optional[str], class_names: Optional[str], mistakes: int, predictions: Optional[str],
             batch_size: int, root_folder: Optional[str], crop_size: Optional[int], resize: Optional[int],
             mean_values: Any, mean_file: Optional[str], scale: Optional[float], engine: str) -> None:
    """Run NET (deploy or train_val) with MODEL over the images of SRC and report how it does.

    Images are transformed as the net's TEST data layer does.  Reported:
    accuracy, top-k accuracy, precision/recall/F1 and support per class, the
    confusion matrix, the expected calibration error (on softmax
    probabilities) and the most confident mistakes.
    """
    from . import api
    from .formats.files import read_bytes

    names = ([line.strip() for line in read_bytes(class_names).decode("utf-8", "replace").splitlines() if line.strip()]
             if class_names else None)
    result = api.evaluate(net_path, weights, data, top_k=tuple(top_k) or (5,), blob=blob, batch_size=batch_size,
                          root_folder=root_folder, class_names=names, mistakes=mistakes, save_predictions=predictions,
                          transform=_transform_overrides(crop_size, resize, mean_values, mean_file, scale),
                          schema=_schema(ctx), engine=_chosen_engine(engine, "cpu"))
    if as_json:
        import json

        _emit(json.dumps(result.as_json(), indent=2) + "\n")
    else:
        _emit(result.report())


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("-o", "--output", metavar="HTML", help="Write the page here (one RUN: its report.html again; "
              "two: the side-by-side page).")
def report(runs: Tuple[str, ...], output: Optional[str]) -> None:
    """Show a run's report.json, or put two runs side by side.

    RUN is a report.json or the directory holding it (a finetune OUTDIR, a
    train --report DIR).  Prints the summary as text; -o writes HTML.
    """
    from .evaluation import report as rep
    from .formats.files import write_atomic

    if len(runs) > 2:
        raise click.UsageError("give one run, or two to compare")
    loaded = [rep.load(path) for path in runs]
    first, second = loaded[0], loaded[-1]
    _emit(rep.compare_text(loaded))
    if output:
        write_atomic(output, rep.render_html(first) if len(loaded) == 1 else rep.render_compare(first, second))


@main.command()
@click.option("--engine", type=click.Choice(["auto", "pycaffe", "torch"]), default="auto", show_default=True,
              help="The engine to check (auto: both; fails only when neither can train).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
def doctor(ctx: click.Context, engine: str, as_json: bool) -> None:
    """What this machine can train with: engines, GPUs, NCCL, free disk.

    One line per check, OK or MISSING with the fix; exit 1 when ENGINE cannot train here."""
    from .training.doctor import diagnose

    report = diagnose(engine)
    if as_json:
        import json

        _emit(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        _emit("".join(line + "\n" for line in report.lines()))
    ctx.exit(0 if report.can_run else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
