"""From a net file and :class:`~caffe_ft.recipe.options.RewriteOptions` to a rewrite plan.

Reads the inputs (upgrading legacy nets first, comments kept), settles
``--strategy auto`` (measuring the data's similarity when it is not given)
and the default output folder, and returns what :func:`rewrite.plan` makes.
Nothing is written here; ``say`` receives the notes a user should see.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

from ..errors import CaffeFtError
from ..formats import files
from ..formats.schema import Schema
from . import rewrite, strategies
from .options import RewriteOptions

Say = Callable[[str], None]


class OptionError(CaffeFtError):
    """Options that do not go together; the CLI shows it as a usage error."""


def current_file(parsed: files.TextFile, schema: Schema, say: Say) -> files.TextFile:
    """``parsed`` itself, or for a legacy net its upgraded text (comments kept)."""
    from ..formats.layout import upgrade_text
    from ..formats.upgrade import net_needs_upgrade

    if not net_needs_upgrade(parsed.message):
        return parsed
    text, notes = upgrade_text(parsed)
    if not notes:  # Caffe's check flags 3-param BatchNorm nets that need nothing
        return parsed
    say(f"{parsed.path}: legacy format upgraded first ({'; '.join(notes)})")
    return files.parse_text(text.encode("utf-8", "surrogateescape"), parsed.path, schema, files.NET)


def choose(schema: Schema, net_path: str, weights: Optional[str], options: RewriteOptions,
           say: Say) -> Tuple[str, strategies.StrategyOptions]:
    """``--strategy auto``: the size x similarity rule, measuring similarity when not given."""
    data = options.data
    size = options.dataset_size or (rewrite.count_images_or_zero(data.train) if data.train else 0)
    if not size:
        raise OptionError("--strategy auto needs --dataset-size (or an image list as --train-data)")
    similarity = options.similarity
    if similarity is None:
        if not (weights and data.train):
            raise OptionError("--strategy auto needs --similarity, or --weights and --train-data to measure it")
        from .advise import measure_similarity

        similarity, numbers = measure_similarity(net_path, weights, data.train, data.val, schema=schema,
                                                 root_folder=data.root_folder)
        for reason in numbers.get("reasons", []):
            say(f"similarity: {reason}")
    strategy, head, reason = strategies.choose_strategy(size, similarity, options.head)
    say(f"auto: {strategy}: {reason}")
    return strategy, head


def plan_rewrite(schema: Schema, net_path: str, options: RewriteOptions, weights: Optional[str] = None,
                 say: Say = lambda text: None) -> rewrite.RewritePlan:
    """The rewrite ``options`` ask for, nothing written yet."""
    net_file = current_file(files.load_text(net_path, schema, files.NET), schema, say)
    solver_file = files.load_text(options.solver_path, schema, files.SOLVER) if options.solver_path else None
    deploy_file = (current_file(files.load_text(options.deploy_path, schema, files.NET), schema, say)
                   if options.deploy_path else None)
    strategy, head = options.strategy, options.head
    if strategy == "auto":
        strategy, head = choose(schema, net_path, weights, options, say)
    outdir = options.outdir or os.path.join(os.path.dirname(net_path) or ".", f"ft-{strategy}")
    try:
        return rewrite.plan(schema, net_file, strategy, head, outdir, options.data, solver_file, deploy_file,
                            options.solver)
    except CaffeFtError as exc:
        raise exc.located(net_path) from None
