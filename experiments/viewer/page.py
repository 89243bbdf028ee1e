"""HTML pages: the static template with the viewer's CSS, JS and a page's data inlined (no network, no CDN)."""

from __future__ import annotations

import base64
import html
import json
import re
import uuid
from functools import cache
from importlib import resources
from pathlib import Path

from experiments.viewer import data as D


@cache
def static(name: str) -> str:
    """A file shipped in `experiments/viewer/static/`."""
    return resources.files("experiments.viewer").joinpath("static", name).read_text()


def _json(doc) -> str:
    """JSON safe inside a `<script>` element (no `</`, no `<!--`)."""
    return json.dumps(doc, separators=(",", ":")).replace("<", "\\u003c")


def html_page(bundle: dict, title: str = "interp viewer") -> str:
    """A whole page: `bundle` (`mode`, `route`, `index`, and per kind `{slug: data}`) inlined with the scripts."""
    values = dict(TITLE=html.escape(title), CSS=static("viewer.css"), DATA=_json(bundle), JS=static("viewer.js"))
    return re.sub(r"\{\{(TITLE|CSS|DATA|JS)\}\}", lambda m: values[m.group(1)], static("page.html"))


def fragment(bundle: dict, uid: str | None = None) -> str:
    """An element for a notebook's output (`_repr_html_`): the same viewer, mounted on a div of its own (its id
    `uid`, default a random `iv-<hex>`; fixed in the snapshot tests)."""
    uid = uid or "iv-" + uuid.uuid4().hex[:12]
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", uid):
        raise ValueError(f"fragment: bad element id {uid!r}")
    bundle = dict(bundle, embedded=True)
    return (f'<div id="{uid}" class="iv-root"></div><style>{static("viewer.css")}</style>'
            f"<script>{static('viewer.js')}</script>"
            f"<script>InterpViewer.mount(document.getElementById({json.dumps(uid)}), {_json(bundle)});</script>")


def load(files: dict[str, dict[str, Path]], kind: str, slug: str):
    """The data of one page (`None` if there is no such page): parsed JSON, or a report's text."""
    path = files.get(kind, {}).get(slug)
    if path is None:
        return None
    return path.read_text() if kind == "report" else json.loads(path.read_text())


def bundle(run_dir: str | Path, files: dict, route: str = "index", *, mode: str = "serve", everything=False) -> dict:
    """The data a page needs: the index, and the page of `route` (`kind/slug`) or with `everything` (an export)
    every page and annotation under `run_dir`."""
    root = Path(run_dir).resolve()
    out = dict(mode=mode, route=route, index=D.index(files, root), annotations={})
    for kind in D.KINDS:
        out[kind] = {}
    wanted = [(k, s) for k in D.KINDS for s in files[k]] if everything else [tuple(route.split("/", 1))]
    for item in wanted:
        if len(item) != 2:
            continue
        kind, slug = item
        doc = load(files, kind, slug)
        if doc is not None:
            out[kind][slug] = doc
            if kind == "report" and mode == "static":  # figures as data: URIs (served pages fetch /file/...)
                for rel, path in D.report_figures(root, files[kind][slug]).items():
                    out.setdefault("files", {})[rel] = (f"data:{D.IMAGES[path.suffix.lower()]};base64,"
                                                        + base64.b64encode(path.read_bytes()).decode())
            if kind == "graph":
                out["annotations"][slug] = D.read_annotations(files[kind][slug])
    return out


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Write one self-contained HTML file with every graph, feature, heads page and report under `run_dir`."""
    files = D.scan(run_dir)
    route = "index"
    if len(files["graph"]) == 1 and not any(files[k] for k in ("feature", "heads", "report")):
        route = "graph/" + next(iter(files["graph"]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_page(bundle(run_dir, files, route, mode="static", everything=True),
                             title=f"interp viewer: {Path(run_dir).name}"))
    return out
