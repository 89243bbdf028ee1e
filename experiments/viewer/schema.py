"""The JSON schemas of the files the viewer reads (`schemas/*.schema.json`) and a small validator of the
draft-07 subset they use: `type`, `required`, `properties`, `items`, `enum`, `minimum`, `maximum` and
local `$ref` (`#/...`)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


@cache
def load(name: str) -> dict:
    """`schemas/<name>.schema.json` (`graph`, `feature`, `heads`)."""
    return json.loads(resources.files("experiments.viewer").joinpath("schemas", f"{name}.schema.json").read_text())


def _is(value, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def errors(doc, schema: dict, where: str = "$", limit: int = 20) -> list[str]:
    """Every violation of `schema` by `doc` (at most `limit`), as `path: message`."""
    out: list[str] = []

    def walk(v, s, at):
        if len(out) >= limit:
            return
        while "$ref" in s:
            ref = s["$ref"]
            if not ref.startswith("#/"):
                raise ValueError(f"only local $ref is supported, not {ref!r}")
            s = schema
            for key in ref[2:].split("/"):
                s = s[key]
        types = s.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not any(_is(v, t) for t in types):
                out.append(f"{at}: expected {'/'.join(types)}, got {type(v).__name__}")
                return
        if "enum" in s and v not in s["enum"]:
            out.append(f"{at}: {v!r} not one of {s['enum']}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if "minimum" in s and v < s["minimum"]:
                out.append(f"{at}: {v} < minimum {s['minimum']}")
            if "maximum" in s and v > s["maximum"]:
                out.append(f"{at}: {v} > maximum {s['maximum']}")
        if isinstance(v, dict):
            out.extend(f"{at}: missing {k!r}" for k in s.get("required", ()) if k not in v)
            for k, sub in s.get("properties", {}).items():
                if k in v:
                    walk(v[k], sub, f"{at}.{k}")
        if isinstance(v, list) and "items" in s:
            for i, item in enumerate(v):
                walk(item, s["items"], f"{at}[{i}]")

    walk(doc, schema, where)
    return out[:limit]


def validate(doc, name: str) -> None:
    """Raise ValueError listing the violations of `schemas/<name>.schema.json`."""
    errs = errors(doc, load(name))
    if errs:
        raise ValueError(f"not a valid {name} file:\n  " + "\n  ".join(errs))
