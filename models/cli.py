"""A command line from a frozen dataclass config: one `--flag` per field, typed, described, defaults shown.

    @dataclass(frozen=True)
    class Config:
        # data
        model: str = "smollm2-135m-instruct"  # registered name, .gguf file or Hugging Face directory
        layers: tuple[int, ...] = (10, 15)  # comma-separated on the command line: --layers 10,15
        lr: float | None = None  # None: the default of the method

    cfg = models.cli.parse(Config, argv, prog="python -m my.module", description=__doc__)

A field's description is `field(metadata={"help": ...})` or else the `#` comment on its line; a comment on a
line of its own starts a group of flags in `--help`. Types: `int` (also `2_000_000`, `1e6`), `float`,
`str`, `bool` (`true/false/1/0/yes/no/on/off`), `X | None` (`none` gives None), `tuple[X, ...]` of those
(comma-separated; an empty string is the empty tuple) and `Literal[...]` (choices). Any other annotation is
a TypeError when the parser is built, never a silent string. An `InputError` or `ValueError` from the
config's own validation is reported as a usage error naming the flag. `parse` adds `--compilation-cache DIR|off`
and turns JAX's persistent compilation cache on (`models.compile_cache`) once the config is valid.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Mapping, Sequence

from models import compile_cache

__all__ = ["field_docs", "parse", "parser"]

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool(s: str) -> bool:
    if s.lower() in _TRUE:
        return True
    if s.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        x = float(s)  # "1e6"; "2.5" is refused below
        if not x.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        return int(x)


def _converter(t, where: str):
    """`str -> value` for the annotation `t` (with a readable `__name__` for argparse's messages)."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: unsupported annotation {t}")
        inner = _converter(rest[0], where)

        def optional(s: str):
            return None if s.lower() == "none" else inner(s)

        optional.__name__ = f"{inner.__name__} or none"
        return optional
    if typing.get_origin(t) is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{where}: tuples must be tuple[X, ...], got {t}")
        inner = _converter(args[0], where)

        def many(s: str):
            return tuple(inner(x.strip()) for x in s.split(",") if x.strip())

        many.__name__ = f"comma-separated {inner.__name__}s"
        return many
    if typing.get_origin(t) is typing.Literal:
        choices = {str(a): a for a in args}

        def choice(s: str):
            if s not in choices:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {s!r}")
            return choices[s]

        choice.__name__ = "choice"
        return choice
    conv = {bool: _bool, int: _int, float: float, str: str}.get(t)
    if conv is None:
        raise TypeError(f"{where}: unsupported annotation {t!r} (use int, float, str, bool, X | None, tuple[X, ...] "
                        "or Literal)")
    return conv


def _metavar(t) -> str:
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return _metavar(args[0])
    if typing.get_origin(t) is tuple:
        return f"{_metavar(args[0])},..."
    if typing.get_origin(t) is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(t, "STR")


def _shown(value) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def field_docs(cls) -> tuple[dict[str, str], dict[str, str]]:
    """`({field: description}, {field: group title})` from field metadata `help` and the class source's
    comments (a comment on a field's line describes it; one on a line of its own titles the next fields)."""
    docs = {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata}
    groups: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs, groups
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(source).body[0].body
    title, last = None, 0
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        for line in range(last + 1, node.lineno):
            if line in comments and line not in code_lines:
                title = comments[line]
        last = node.end_lineno
        if title:
            groups[name] = title
        if name not in docs:
            own = [comments[line] for line in range(node.lineno, node.end_lineno + 1) if line in comments]
            if own:
                docs[name] = " ".join(own)
    return docs, groups


def parser(cls, *, prog: str | None = None, description: str | None = None,
           docs: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """An `argparse` parser with one `--field-name` flag per field of the dataclass `cls`; `docs` overrides
    descriptions. `parser(...).parse_args(argv)` gives a namespace of converted values (`cls(**vars(ns))`)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    helps, titles = field_docs(cls)
    helps.update(docs or {})
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        conv = _converter(hints[f.name], f"{cls.__name__}.{f.name}")
        text = helps.get(f.name, "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        shown = "required" if required else f"default: {_shown(default)}"
        text = f"{text} ({shown})" if text else f"({shown})"
        title = titles.get(f.name)
        target = p if title is None else groups.setdefault(title, p.add_argument_group(title))
        metavar = _metavar(hints[f.name])
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=default,
                            required=required, help=text.replace("%", "%%"), metavar=metavar)
    return p


def parse(cls, argv: Sequence[str] | None = None, *, prog: str | None = None, description: str | None = None,
          docs: Mapping[str, str] | None = None):
    """`cls` filled from `--field value` flags (`argv=None`: `sys.argv[1:]`); the config's own validation
    errors (`InputError`, `ValueError`) exit with a usage message, as a bad flag does."""
    p = parser(cls, prog=prog, description=description, docs=docs)
    p.add_argument("--compilation-cache", dest="_compilation_cache", default=None, metavar="DIR|off",
                   help="JAX's persistent compilation cache: a directory, or off (default: $INTERP_COMPILATION_CACHE, "
                        "else ~/.cache/interp/jax-compilation; models.compile_cache)")
    ns = vars(p.parse_args(argv))
    cache = ns.pop("_compilation_cache")
    try:
        cfg = cls(**ns)
    except ValueError as e:  # models.InputError is a ValueError
        p.error(str(e))
    compile_cache.enable(cache)  # after validation: a bad flag costs nothing
    return cfg
