"""`serve`: a standard-library HTTP server on 127.0.0.1 over a run directory.

    GET  /                       index page          GET /api/index                the index as JSON
    GET  /<kind>/<slug>          a page              GET /api/<kind>/<slug>        its data (graph, feature, heads, report)
    GET  /api/annotations/<slug> a graph's labels    POST /api/annotations/<slug>  save them beside the graph
    GET  /file/<path>            an image under the run directory (a report's figure)
    GET  /api/search?q=<snippet>[&dict=<name>]   features that fire on a snippet: with a `search` function
                                 (`data.model_search`: the model and dictionaries loaded) the largest activations
                                 per token, else a substring search over the stored contexts of feature pages

Slugs are file stems: anything with `..`, `/`, NUL or not in the index answers 400 or 404."""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from experiments.viewer import data as D
from experiments.viewer import page

HOST = "127.0.0.1"
MAX_POST = 4 << 20


class _Handler(BaseHTTPRequestHandler):
    server_version = "interp-viewer"
    root: Path
    search: dict = {}

    def log_message(self, fmt, *args):  # quiet: the CLI prints the address
        pass

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            # what was asked and from which page (Referer / Origin), for tests and debugging
            self.server.requests.append((self.command, self.path, self.headers.get("Referer") or self.headers.get("Origin")))
        return ok

    def _send(self, status: int, body: str | bytes, ctype: str = "application/json"):
        text = isinstance(body, str)
        body = body.encode() if text else body
        self.send_response(status)
        self.send_header("Content-Type", ctype + ("; charset=utf-8" if text else ""))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, msg: str):
        self._send(status, json.dumps({"error": msg}))

    def _parts(self) -> list[str] | None:
        raw = urlsplit(self.path).path
        parts = [unquote(p) for p in raw.split("/")[1:]]
        if "%2f" in raw.lower() or any(p in ("..", ".") or "\0" in p or "\\" in p for p in parts):
            return None
        return [p for p in parts if p]

    def _slug(self, slug: str) -> str | None:
        try:
            return D.check_slug(slug)
        except D.BadSlug as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return None

    def do_GET(self):  # noqa: N802 (http.server's name)
        parts = self._parts()
        if parts is None:
            return self._error(HTTPStatus.BAD_REQUEST, "bad path")
        if parts[:1] == ["file"]:  # an image under the run directory (a report's figure)
            path = D.image_file(self.root, "/".join(parts[1:]))
            if path is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such image")
            return self._send(200, path.read_bytes(), D.IMAGES[path.suffix.lower()])
        files = D.scan(self.root)
        if parts in ([], ["index"]):
            return self._send(200, page.html_page(page.bundle(self.root, files)), "text/html")
        if parts == ["api", "index"]:
            return self._send(200, json.dumps(D.index(files, self.root)))
        if parts == ["api", "search"]:
            return self._search(files)
        api = parts[0] == "api"
        rest = parts[1:] if api else parts
        if len(rest) != 2:
            return self._error(HTTPStatus.NOT_FOUND, "no such page")
        kind, slug = rest
        if self._slug(slug) is None:
            return
        if api and kind == "annotations":
            path = files["graph"].get(slug)
            if path is None:
                return self._error(HTTPStatus.NOT_FOUND, f"no graph {slug!r}")
            return self._send(200, json.dumps(D.read_annotations(path)))
        doc = page.load(files, kind, slug) if kind in D.KINDS else None
        if doc is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no {kind} {slug!r}")
        if api:
            return self._send(200, doc if kind == "report" else json.dumps(doc),
                              "text/markdown" if kind == "report" else "application/json")
        return self._send(200, page.html_page(page.bundle(self.root, files, f"{kind}/{slug}"), title=slug), "text/html")

    def _search(self, files):
        query = parse_qs(urlsplit(self.path).query)
        q = (query.get("q") or [""])[0]
        if len(q) > 1000:
            return self._error(HTTPStatus.BAD_REQUEST, "snippet too long (1000 characters at most)")
        name = (query.get("dict") or [next(iter(self.search), "")])[0]
        pages = set(files["feature"])
        if self.search:
            if name not in self.search:
                return self._error(HTTPStatus.NOT_FOUND, f"no dictionary {name!r}: {sorted(self.search)}")
            out = dict(self.search[name](q), mode="model", q=q, dict=name)
        else:
            docs = {s: page.load(files, "feature", s) for s in files["feature"]}
            out = dict(mode="contexts", q=q, dict=None, results=D.search_contexts(docs, q))
        for r in out["results"]:
            r["has_page"] = r["slug"] in pages
        return self._send(200, json.dumps(out))

    def do_POST(self):  # noqa: N802
        parts = self._parts()
        if parts is None:
            return self._error(HTTPStatus.BAD_REQUEST, "bad path")
        if len(parts) != 3 or parts[:2] != ["api", "annotations"]:
            return self._error(HTTPStatus.NOT_FOUND, "POST /api/annotations/<slug> only")
        slug = self._slug(parts[2])
        if slug is None:
            return
        path = D.scan(self.root)["graph"].get(slug)
        if path is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no graph {slug!r}")
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_POST:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "annotations too large")
        try:
            D.write_annotations(path, json.loads(self.rfile.read(n)))
        except ValueError as e:
            return self._error(HTTPStatus.BAD_REQUEST, f"bad annotations: {e}")
        self._send(200, json.dumps({"saved": str(D.annotations_path(path).relative_to(self.root))}))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a browser that went away
            super().handle_error(request, client_address)


def make_server(run_dir: str | Path, port: int = 0, search=None) -> ThreadingHTTPServer:
    """A server over `run_dir` bound to 127.0.0.1:`port` (0: a free port; `server.server_address[1]`). `search`:
    a function `snippet -> {"tokens", "results"}` (`data.model_search(model, transcoders)`), or `{name: such a
    function}` picked by `/api/search?dict=name`; without it search runs over the feature pages' contexts."""
    root = Path(run_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    search = {} if search is None else search if isinstance(search, dict) else {"default": search}
    handler = type("Handler", (_Handler,), {"root": root, "search": search})
    srv = _Server((HOST, port), handler)
    srv.requests = []  # (method, path, referer or origin) of every request served
    return srv


def serve_in_thread(run_dir: str | Path, port: int = 0, search=None) -> ThreadingHTTPServer:
    """Start `make_server` in a daemon thread (stop it with `.shutdown()` then `.server_close()`)."""
    srv = make_server(run_dir, port, search)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
