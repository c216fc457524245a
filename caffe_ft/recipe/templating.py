"""The jinja2 templates of ``templates/`` that generated layers and solvers
come from."""

from __future__ import annotations

import functools
from typing import Any

from ..resources import resource_dir
from ..formats.prototext import format_string


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(resource_dir("templates")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["q"] = format_string  # a quoted, escaped prototxt string
    return env


def render(template: str, /, **context: Any) -> str:
    """The text of ``template`` (a file name in ``templates/``) filled with ``context``."""
    return _environment().get_template(template).render(**context)
