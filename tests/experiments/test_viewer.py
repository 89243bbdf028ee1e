"""The offline viewer (experiments.viewer) on a sample run from a tiny random model: every file it reads
validates against the schemas kept in the repo, the loopback server (GET index / graph / feature, annotations
POSTed, kept over a restart, path traversal refused), the self-contained export, notebook views, feature search
(stored contexts, or the model and its transcoders), a transcoder feature's read / write panels, the heads page's
ablation heatmap, the probe-grid page, snapshots of rendered HTML (tests/experiments/snapshots/, regenerated with
INTERP_UPDATE_SNAPSHOTS=1), and a real headless Chromium rendering the pages (skipped without /usr/bin/chromium
unless INTERP_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from experiments import viewer
from experiments.viewer import data as D
from experiments.viewer import page, schema, server
from experiments.viewer.sample import write_tiny_run
from tests._chromium import Browser

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer-run")
    return root, write_tiny_run(root)


def _graph(run) -> dict:
    return json.loads(run[1]["graph"].read_text())


def _feature_node(run) -> tuple[str, str]:
    """A feature node of the graph that has a feature page, and that page's slug (`layer_feature`)."""
    for n in _graph(run)["nodes"]:
        fslug = "_".join(n["node_id"].split("_")[:2])
        if n["feature_type"] == "cross layer transcoder" and (run[0] / "features" / f"{fslug}.json").exists():
            return n["node_id"], fslug
    raise AssertionError("no feature node has a page")


# ----------------------------------------------------------------------------- files and schemas


def test_every_file_we_write_validates_against_the_schemas(run):
    root, out = run
    written = {"graph": [out["graph"]], "feature": out["features"], "heads": [out["heads"]], "probes": [out["probes"]]}
    assert len(out["features"]) >= 2
    for kind, paths in written.items():
        for p in paths:
            schema.validate(json.loads(p.read_text()), kind)
    kinds = {n["feature_type"] for n in _graph(run)["nodes"]}
    assert {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"} <= kinds
    feat = json.loads(out["features"][0].read_text())
    top = feat["activations"][0]
    assert top["values"][top["maxValueTokenIndex"]] == pytest.approx(top["maxValue"], rel=1e-4, abs=1e-5)
    assert len(feat["pos_str"]) == 10 and feat["pos_values"][0] >= feat["neg_values"][0]
    n_rows, T = 32, 12  # the sample's rows; first positions excluded as top_activations excludes them
    assert sum(feat["freq_hist_data_bar_heights"]) == pytest.approx(feat["frac_nonzero"] * n_rows * (T - 1), abs=0.5)
    band_max = [a["maxValue"] for q in feat["quantiles"] for a in q["activations"]]
    assert band_max and max(band_max) <= top["maxValue"] + 1e-6
    bad = _graph(run)
    bad["nodes"][0]["feature_type"] = "neuron"
    del bad["links"][0]["weight"]
    errs = schema.errors(bad, schema.load("graph"))
    assert any("feature_type" in e for e in errs) and any("missing 'weight'" in e for e in errs)
    assert {"encoder_site", "decoder_site", "enc_str", "enc_values"} <= set(feat)  # a transcoder's two sides
    bad_feat = dict(feat, enc_values=["x"])
    assert any("enc_values[0]" in e for e in schema.errors(bad_feat, schema.load("feature")))
    heads = json.loads(out["heads"].read_text())
    bad_heads = dict(heads, ablation={"values": [[1.0, "x"]]})
    errs = schema.errors(bad_heads, schema.load("heads"))
    assert any("missing 'name'" in e for e in errs) and any("values[0][1]" in e for e in errs)
    probes = json.loads(out["probes"].read_text())
    assert any("values[0][0]" in e for e in schema.errors(dict(probes, values=[[1.5]]), schema.load("probes")))
    try:  # the same verdicts as the reference validator, where it is installed
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(_graph(run), schema.load("graph"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema.load("graph"))


@pytest.mark.parametrize("slug", ["..", "../x", "a/b", "/etc/passwd", "a\0b", "", "x..y", "a\\b", ".hidden"])
def test_bad_slugs_are_refused(slug):
    with pytest.raises(D.BadSlug):
        D.check_slug(slug)


def test_nothing_below_the_viewer_imports_it():
    root = Path(__file__).resolve().parents[2]
    for pkg in ("models", "interp", "saes", "experiments"):
        for f in (root / pkg).rglob("*.py"):
            if "viewer" in f.relative_to(root).parts:
                continue
            imports = re.compile(r"^\s*(from|import)\s+experiments(\.viewer\b|\s+import\s+.*\bviewer\b)", re.M)
            assert not imports.search(f.read_text()), f


# ----------------------------------------------------------------------------- the server


def _request(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, body=None if body is None else json.dumps(body),
                  headers={"Content-Type": "application/json"} if body is not None else {})
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def _request_bytes(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _stop(srv):
    srv.shutdown()
    srv.server_close()


def test_server_index_graph_feature_annotations_and_restart(run):
    root, out = run
    srv = server.serve_in_thread(root)
    host, port = srv.server_address[:2]
    assert host == "127.0.0.1"
    try:
        status, body = _request(port, "GET", "/")
        assert status == 200 and 'id="interp-data"' in body
        status, body = _request(port, "GET", "/api/index")
        index = json.loads(body)
        assert [r["slug"] for r in index["graph"]] == ["tiny"] and len(index["feature"]) == len(out["features"])
        assert [r["slug"] for r in index["heads"]] == ["tiny"] and [r["slug"] for r in index["report"]] == ["report"]
        status, body = _request(port, "GET", "/api/graph/tiny")
        assert status == 200 and json.loads(body) == _graph(run)
        fslug = out["features"][0].stem
        status, body = _request(port, "GET", f"/api/feature/{fslug}")
        assert status == 200 and json.loads(body)["kind"] == "feature"
        for path in ("/graph/tiny", f"/feature/{fslug}", "/heads/tiny", "/report/report"):
            status, body = _request(port, "GET", path)
            assert status == 200 and "InterpViewer.mount" in body, path
        assert _request(port, "GET", "/api/graph/nothere")[0] == 404
        status, body = _request_bytes(port, "/file/figures/influence.png")
        assert status == 200 and body == (root / "figures" / "influence.png").read_bytes()
        for bad in ("/file/graphs/tiny.json", "/file/../../etc/passwd", "/file/%2Fetc%2Fpasswd", "/file/figures"):
            assert _request(port, "GET", bad)[0] in (400, 404), bad
        assert _request(port, "GET", "/api/annotations/tiny") == (200, "{}")
        node = next(n["node_id"] for n in _graph(run)["nodes"] if n["feature_type"] == "cross layer transcoder")
        ann = {"labels": {node: "says France"}, "pinnedIds": [node], "supernodes": [["capital", node]], "x": 1}
        status, body = _request(port, "POST", "/api/annotations/tiny", ann)
        assert status == 200 and json.loads(body)["saved"] == "graphs/tiny.annotations.json"
        assert _request(port, "POST", "/api/annotations/tiny", ["not", "an", "object"])[0] == 400
    finally:
        _stop(srv)
    srv = server.serve_in_thread(root)  # a restart reads the annotations back from beside the graph
    port = srv.server_address[1]
    try:
        status, body = _request(port, "GET", "/api/annotations/tiny")
        assert json.loads(body) == {k: v for k, v in ann.items() if k != "x"}
        assert "says France" in _request(port, "GET", "/graph/tiny")[1]
        assert "tiny.annotations" not in _request(port, "GET", "/api/index")[1]  # not listed as a graph
    finally:
        _stop(srv)


@pytest.mark.parametrize("path", ["/api/graph/..%2F..%2Fetc%2Fpasswd", "/api/graph/%2e%2e", "/api/graph/../../x",
                                  "/api/graph/%2Fetc%2Fpasswd", "/api/graph/a%00b", "/graph/..", "/feature/x..y",
                                  "/api/annotations/%2e%2e%2fgraphs%2ftiny"])
def test_server_refuses_path_traversal(run, path):
    srv = server.serve_in_thread(run[0])
    try:
        port = srv.server_address[1]
        assert _request(port, "GET", path)[0] == 400
        assert _request(port, "POST", path.replace("/graph/", "/annotations/"), {"labels": {}})[0] in (400, 404)
    finally:
        _stop(srv)
    assert not any(p.name.endswith(".annotations.json") and p.parent.name != "graphs" for p in run[0].rglob("*"))


# ----------------------------------------------------------------------------- export and notebooks


def test_export_is_one_self_contained_file(run, tmp_path):
    out = page.export(run[0], tmp_path / "page.html")
    text = out.read_text()
    assert "InterpViewer.mount" in text and "iv-root" in text and '"tiny"' in text
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # no CDN, no remote script, style or font
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)
    assert "connect-src 'self'" in text  # the page's CSP: requests only to the server that served it
    assert out.stat().st_size < 2_000_000
    assert "data:image/png;base64," in text  # the report's figure, inlined


def test_show_renders_graph_feature_and_heads_views(run):
    root, out = run
    v = viewer.show(out["graph_obj"], slug="g", node_threshold=0.99, edge_threshold=0.99)
    html = v._repr_html_()
    assert v.kind == "graph" and "InterpViewer.mount" in html and '"embedded":true' in html
    assert all(n["node_id"] in html for n in _graph(run)["nodes"][:5])
    assert viewer.show(json.loads(out["features"][0].read_text())).kind == "feature"
    heads = viewer.show(json.loads(out["heads"].read_text()))
    assert heads.kind == "heads" and "<!DOCTYPE html>" in heads.html()
    probes = viewer.show(json.loads(out["probes"].read_text()))
    assert probes.kind == "probes" and '"route":"probes/page"' in probes._repr_html_()
    with pytest.raises(TypeError):
        viewer.show(3)


# ----------------------------------------------------------------------------- a real browser


def _chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("INTERP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"INTERP_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install -y chromium)")
    pytest.skip(f"no {CHROMIUM} (Debian: apt-get install -y chromium; .ci/run installs it)")


def _browse(url: str, tmp_path: Path, screenshot: Path | None = None, proxy: int | None = None) -> str:
    """The DOM after the page's scripts ran (`--dump-dom`), or with `screenshot` a PNG of it; with `proxy` every
    request not to loopback goes to that port of 127.0.0.1."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}"]
    args += [f"--proxy-server=http://127.0.0.1:{proxy}", "--disable-features=AutofillServerCommunication,"
             "OptimizationHints,MediaRouter,Translate,NetworkTimeServiceQuerying", "--no-pings"] if proxy else []
    args += [f"--screenshot={screenshot}", "--window-size=1200,800"] if screenshot else ["--dump-dom"]
    r = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _node_count(dom: str) -> int:
    return len(re.findall(r"<circle[^>]*data-node=", dom))


def test_browser_renders_the_exported_pages(run, tmp_path):
    _chromium()
    root, out = run
    html = page.export(root, tmp_path / "page.html")
    g = _graph(run)
    dom = _browse(f"file://{html}#graph/tiny", tmp_path)
    assert 'data-rendered="1"' in dom and _node_count(dom) == len(g["nodes"])
    node, fslug = _feature_node(run)
    dom = _browse(f"file://{html}#graph/tiny/{node}", tmp_path)  # that node clicked
    assert f'href="#feature/{fslug}"' in dom and 'class="iv-open-feature"' in dom
    assert re.search(rf'<circle[^>]*data-node="{node}"[^>]*class="[^"]*\bclicked\b', dom)
    fdoc = json.loads(out["features"][0].read_text())
    dom = _browse(f"file://{html}#feature/{out['features'][0].stem}", tmp_path)
    top = re.search(r'<li data-max="[^"]*">(.*?)</li>', dom, re.S).group(1)
    assert re.findall(r'<span class="iv-t[^"]*"[^>]*>([^<]*)</span>', top) == fdoc["activations"][0]["tokens"]
    assert len(re.findall(r'<rect[^>]*class="iv-bar"', dom)) == len(fdoc["freq_hist_data_bar_heights"]) > 0
    assert len(re.findall(r'<ol class="iv-quantile"', dom)) == sum(bool(q["activations"]) for q in fdoc["quantiles"]) > 0
    heads = json.loads(out["heads"].read_text())
    dom = _browse(f"file://{html}#heads/tiny", tmp_path)
    T = len(heads["tokens"])
    assert len(re.findall(r"<rect[^>]*data-q=", dom)) >= T * (T + 1) // 2  # the causal pattern of L0H0
    assert set(heads["scores"]) == {"previous_token", "first_token", "induction"}
    cells = len(heads["scores"]) * len(heads["patterns"]) * len(heads["patterns"][0])
    assert len(re.findall(r'<td class="iv-cell"', dom)) == cells


def test_browser_renders_the_notebook_fragment(run, tmp_path):
    """`show(graph)._repr_html_()` inside a page (as a notebook output shows it) mounts the same graph, twice."""
    _chromium()
    v = viewer.show(run[1]["graph_obj"], slug="g", node_threshold=0.99, edge_threshold=0.99)
    page_path = tmp_path / "nb.html"
    page_path.write_text(f"<!DOCTYPE html><html><body>{v._repr_html_()}<hr>{v._repr_html_()}</body></html>")
    dom = _browse(f"file://{page_path}", tmp_path)
    assert dom.count('data-rendered="1"') == 2 and _node_count(dom) == 2 * len(v.doc["nodes"])
    assert 'class="iv-nav"' not in dom  # embedded: no navigation bar


def test_browser_renders_the_served_graph_and_a_screenshot(run, tmp_path):
    """The served page renders every node of the graph file and asks nothing of anyone but its page (a trap
    proxy takes whatever is not for loopback: it stays empty)."""
    _chromium()
    root, _ = run
    srv, trap = server.serve_in_thread(root), server.serve_in_thread(tmp_path)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/graph/tiny"
        dom = _browse(url, tmp_path, proxy=trap.server_address[1])
        assert _node_count(dom) == len(_graph(run)["nodes"])
        page_origin = f"http://127.0.0.1:{srv.server_address[1]}"
        # the browser's own background traffic (accounts, www) goes to google.com and carries no referer;
        # a page's http request carries its origin, an https one shows as CONNECT host:443
        assert [r for r in trap.requests if r[2] and r[2].startswith(page_origin)] == []
        hosts = {urlsplit(p if "://" in p else "//" + p).hostname for _, p, _ in trap.requests}
        assert all(h == "google.com" or h.endswith(".google.com") for h in hosts), hosts
        assert {p for _, p, _ in srv.requests} <= {"/graph/tiny", "/favicon.ico"}, srv.requests
        shot = root / "screenshots" / "graph.png"
        shot.parent.mkdir(exist_ok=True)
        _browse(url, tmp_path, screenshot=shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        _stop(srv)
        _stop(trap)


def test_browser_clicks_from_the_graph_to_a_feature_page(run, tmp_path):
    """Real mouse clicks in the exported page: a feature node, then its 'open feature' link, land on that
    feature's page with its top context; a label typed and saved on the served page reaches the annotations
    file."""
    root, out = run
    html = page.export(root, tmp_path / "page.html")
    node, fslug = _feature_node(run)
    with Browser(_chromium()) as b:
        b.open(f"file://{html}#graph/tiny")
        assert b.eval("document.querySelectorAll('circle[data-node]').length") == len(_graph(run)["nodes"])
        nodes = _graph(run)["nodes"]  # the pruning slider at half way: nodes of cumulative influence <= half the max
        half = max(n["influence"] for n in nodes if n["influence"] is not None) / 2
        b.eval("(() => { const s = document.querySelector('.iv-prune'); s.value = 500;"
               " s.dispatchEvent(new Event('input')); })()")
        kept = [n for n in nodes if n["feature_type"] in ("embedding", "logit") or n["influence"] <= half + 1e-12]
        assert len(kept) < len(nodes)
        b.wait(f"document.querySelectorAll('circle[data-node]').length === {len(kept)}", timeout=10)
        b.eval("(() => { const s = document.querySelector('.iv-prune'); s.value = 1000;"
               " s.dispatchEvent(new Event('input')); })()")
        b.wait(f"document.querySelectorAll('circle[data-node]').length === {len(nodes)}", timeout=10)
        b.click(f'circle[data-node="{node}"]')
        assert b.eval("document.querySelector('.iv-panel h3').textContent") == node
        assert b.eval("document.querySelectorAll('.iv-edge.hl').length") > 0
        b.click(".iv-open-feature")
        b.wait(f"document.querySelector('.iv-feature[data-slug=\"{fslug}\"]')")
        tokens = b.eval("[...document.querySelectorAll('.iv-contexts li:first-child .iv-t')].map((e) => e.textContent)")
        assert tokens == json.loads((root / "features" / f"{fslug}.json").read_text())["activations"][0]["tokens"]
        b.eval("location.hash = '#report/report'")
        b.wait("document.querySelector('img.iv-figure') && document.querySelector('img.iv-figure').complete")
        assert b.eval("document.querySelector('img.iv-figure').naturalWidth") == 320  # 4 in x 80 dpi
    srv = server.serve_in_thread(root)
    try:
        with Browser(_chromium()) as b:
            b.open(f"http://127.0.0.1:{srv.server_address[1]}/graph/tiny")
            b.click(f'circle[data-node="{node}"]')
            b.eval("document.querySelector('.iv-label-input').value = 'clicked in chromium'")
            b.click(".iv-save")
            b.wait("document.querySelector('.iv-status').textContent.includes('saved')")
            b.open(f"http://127.0.0.1:{srv.server_address[1]}/report/report")
            b.wait("document.querySelector('img.iv-figure').complete")
            assert b.eval("document.querySelector('img.iv-figure').naturalWidth") == 320
        saved = json.loads((root / "graphs" / "tiny.annotations.json").read_text())
        assert saved["labels"][node] == "clicked in chromium"
    finally:
        _stop(srv)


# ----------------------------------------------------------------------------- feature search


def _search_query(run) -> tuple[str, dict]:
    """A snippet taken from a stored context (two tokens around the top token of a feature's best context) and
    every feature page's data."""
    docs = {p.stem: json.loads(p.read_text()) for p in run[1]["features"]}
    top = docs[run[1]["features"][0].stem]["activations"][0]
    i = max(top["maxValueTokenIndex"], 1)
    return "".join(top["tokens"][i - 1:i + 1]).strip(), docs


def test_search_over_stored_contexts(run):
    """Without a model the server searches the feature pages' stored contexts (case-insensitive substring);
    the feature the snippet came from is found, scored by the largest activation on a matched token."""
    q, docs = _search_query(run)
    hits = D.search_contexts(docs, q.upper())
    assert hits and run[1]["features"][0].stem in [h["slug"] for h in hits]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert q in h["context"] and h["token"].strip() in q
    assert D.search_contexts(docs, "no such snippet anywhere") == [] and D.search_contexts(docs, "") == []
    srv = server.serve_in_thread(run[0])
    try:
        port = srv.server_address[1]
        status, body = _request(port, "GET", "/api/search?q=" + q.replace(" ", "+"))
        r = json.loads(body)
        assert status == 200 and r["mode"] == "contexts" and r["q"] == q
        assert [h["slug"] for h in r["results"]] == [h["slug"] for h in D.search_contexts(docs, q)]
        assert all(h["has_page"] for h in r["results"])
        assert _request(port, "GET", "/api/search?q=" + "x" * 1001)[0] == 400
    finally:
        _stop(srv)


def test_search_with_the_model_and_dictionaries(run):
    """With a model and its transcoders loaded at serve time (`data.model_search`), a snippet is tokenised and
    each token's strongest features come back: the same activations the dictionaries compute directly."""
    import numpy as np
    from saes.analysis.features import site_acts

    root, out = run
    m, tcs = out["model"], out["transcoders"]
    q, _ = _search_query(run)
    srv = server.serve_in_thread(root, search=D.model_search(m, tcs, k=3))
    try:
        port = srv.server_address[1]
        status, body = _request(port, "GET", "/api/search?q=" + q.replace(" ", "%20"))
        r = json.loads(body)
        assert _request(port, "GET", "/api/search?q=w1&dict=nothere")[0] == 404
    finally:
        _stop(srv)
    ids = np.asarray(m.tokenizer.encode(q))[None]
    assert status == 200 and r["mode"] == "model" and r["tokens"] == [m.tokenizer.decode([i]) for i in ids[0]]
    assert r["results"] and [h["score"] for h in r["results"]] == sorted((h["score"] for h in r["results"]), reverse=True)
    pages = {p.stem for p in out["features"]}
    for h in r["results"][:5]:
        sae = tcs.transcoders[h["layer"]]
        f = np.asarray(sae.encode(site_acts(m, sae, ids, np.ones_like(ids))))[0]
        assert h["score"] == pytest.approx(float(f[h["pos"], h["index"]]), rel=1e-4, abs=1e-6)
        assert np.sum(f[h["pos"]] > f[h["pos"], h["index"]]) < 3  # among that token's 3 strongest
        assert h["has_page"] == (h["slug"] in pages)


def test_browser_searches_features_in_the_export_and_on_the_server(run, tmp_path):
    """The exported page searches its inlined feature pages in JavaScript (the same hits as the Python
    search); the served page asks /api/search (here with the model) and nothing else; a hit links to its
    feature page."""
    root, out = run
    q, docs = _search_query(run)
    html = page.export(root, tmp_path / "page.html")
    want = [h["slug"] for h in D.search_contexts(docs, q)]
    type_and_search = (f"(() => {{ document.querySelector('.iv-search').value = {json.dumps(q)}; }})()")
    with Browser(_chromium()) as b:
        b.open(f"file://{html}#index")
        b.eval(type_and_search)
        b.click(".iv-search-go")
        b.wait("document.querySelectorAll('.iv-search-results li').length > 0")
        assert b.eval("[...document.querySelectorAll('.iv-search-results li')].map((e) => e.dataset.slug)") == want
        assert "stored contexts" in b.eval("document.querySelector('.iv-search-mode').textContent")
        b.click(".iv-search-results li a")
        b.wait(f"document.querySelector('.iv-feature[data-slug=\"{want[0]}\"]')")
    srv = server.serve_in_thread(root, search=D.model_search(out["model"], out["transcoders"], k=3))
    try:
        with Browser(_chromium()) as b:
            b.open(f"http://127.0.0.1:{srv.server_address[1]}/")
            b.eval(type_and_search)
            b.click(".iv-search-go")
            b.wait("document.querySelectorAll('.iv-search-results li').length > 0", timeout=120)
            assert "activations on the snippet" in b.eval("document.querySelector('.iv-search-mode').textContent")
            slugs = b.eval("[...document.querySelectorAll('.iv-search-results li')].map((e) => e.dataset.slug)")
            links = b.eval("[...document.querySelectorAll('.iv-search-results li a')].map((e) => e.dataset.link)")
        assert slugs and links == [f"feature/{s}" for s in slugs if (root / "features" / f"{s}.json").exists()]
        paths = {urlsplit(p).path for _, p, _ in srv.requests}
        assert paths <= {"/", "/api/search", "/favicon.ico"}, srv.requests
    finally:
        _stop(srv)


# ----------------------------------------------------------------------------- transcoder features, heads, probes


def test_transcoder_feature_reads_and_writes(run, tmp_path):
    """A transcoder's feature page: the encoder side (tokens whose embedding, through the layer's pre-MLP norm,
    most excites the feature: recomputed here in numpy) and the decoder side (logit effects of the vector it
    writes into mlp_out), each in its own panel."""
    import numpy as np

    root, out = run
    m, tcs = out["model"], out["transcoders"]
    path = out["features"][0]
    f = json.loads(path.read_text())
    layer, index = f["layer"], f["index"]
    assert (f["encoder_site"], f["decoder_site"]) == ("ln2.normalized", "mlp_out")
    sae = tcs.transcoders[layer]
    W_E = np.asarray(m.params["embed"]["W_E"], np.float64)
    w = np.asarray(m.params["blocks"]["ln2"]["w"], np.float64)[layer]
    assert m.cfg.norm == "rms"
    x = W_E / np.sqrt((W_E ** 2).mean(-1, keepdims=True) + m.cfg.norm_eps) * w * float(sae.act_scale)
    pre = x @ np.asarray(sae.W_enc, np.float64)[:, index] + float(np.asarray(sae.enc_bias())[index])
    top = np.argsort(pre)[::-1][:10]
    assert f["enc_str"] == [m.tokenizer.decode([i]) for i in top]
    np.testing.assert_allclose(f["enc_values"], pre[top], rtol=1e-4, atol=1e-5)
    html = page.export(root, tmp_path / "page.html")
    with Browser(_chromium()) as b:
        b.open(f"file://{html}#feature/{path.stem}")
        reads = b.eval("[...document.querySelectorAll('.iv-reads .iv-effects td.iv-t')].map((e) => e.textContent)")
        writes = b.eval("[...document.querySelectorAll('.iv-writes .iv-effects.pos td.iv-t')].map((e) => e.textContent)")
        heads = b.eval("[...document.querySelectorAll('.iv-reads h3, .iv-writes h3')].map((e) => e.textContent)")
    assert reads == f["enc_str"] and writes == f["pos_str"]
    assert heads == ["reads (encoder, ln2.normalized)", "writes (decoder, mlp_out)"]


def test_browser_heads_ablation_heatmap_opens_a_head(run, tmp_path):
    """The heads page's ablation sweep (interp.head_ablation, saved in the heads file): one cell per layer and
    head, and a click on a cell shows that head's pattern."""
    import numpy as np
    from interp import TokenLogProb, head_ablation

    from experiments.viewer.sample import TOKENS

    root, out = run
    d = json.loads(out["heads"].read_text())
    L, H = len(d["patterns"]), len(d["patterns"][0])
    effects = head_ablation(out["model"], TOKENS[None, :-1], None, TokenLogProb(int(TOKENS[-1])))
    np.testing.assert_allclose(d["ablation"]["values"], np.asarray(effects), rtol=1e-6, atol=1e-7)
    html = page.export(root, tmp_path / "page.html")
    with Browser(_chromium()) as b:
        b.open(f"file://{html}#heads/tiny")
        assert b.eval("document.querySelectorAll('rect.iv-abl-cell').length") == L * H
        l, h = L - 1, H - 1
        b.click(f'rect.iv-abl-cell[data-head="{l}.{h}"]')
        b.wait(f"document.querySelector('.iv-heads h3').textContent.startsWith('layer {l}, head {h} ')")
        T = len(d["tokens"])  # the pattern drawn is that head's: its last query row's shading
        fills = b.eval("[...document.querySelectorAll('.iv-pattern rect')].filter((e) => e.dataset.q === "
                       f"'{T - 1}').map((e) => e.style.fill)")
        alphas = [float(([*re.findall(r"[\d.]+", f), "1"])[3]) for f in fills]
        assert alphas == pytest.approx(d["patterns"][l][h][T - 1], abs=5e-3)  # the CSS alpha: 8 bits
        other = d["patterns"][0][0][T - 1]
        assert alphas != pytest.approx(other, abs=5e-3)  # not the first head's
        b.open(f"file://{html}#heads/tiny/1.2")  # a link to a head
        assert b.eval("document.querySelector('.iv-heads h3').textContent").startswith("layer 1, head 2 ")


def test_browser_probe_grid_page(run, tmp_path):
    """The probe-grid page: one SVG cell per (layer, position) with its AUROC, the surface baseline beside it,
    cells above the baseline outlined, the best cell marked."""
    root, out = run
    d = json.loads(out["probes"].read_text())
    L, P = len(d["layers"]), len(d["positions"])
    assert L * P == 9 and d["surface"] is not None
    html = page.export(root, tmp_path / "page.html")
    with Browser(_chromium()) as b:
        b.open(f"file://{html}#probes/tiny")
        assert b.eval("document.querySelectorAll('rect.iv-probe-cell').length") == L * P
        assert b.eval("document.querySelectorAll('rect.iv-surface-cell').length") == 1
        above = sum(v > d["surface"]["auroc"] for row in d["values"] for v in row)
        assert b.eval("document.querySelectorAll('rect.iv-probe-cell.above').length") == above
        bi, bj = d["best"]
        assert b.eval("document.querySelector('rect.iv-probe-cell.best').dataset.cell") == f"{bi}.{bj}"
        assert str(round(d["surface"]["auroc"], 3)).rstrip("0") in b.eval("document.querySelector('.iv-surface').textContent")
        b.open(f"file://{html}#index")
        assert b.eval("document.querySelector('[data-link=\"probes/tiny\"]') !== null")


# ----------------------------------------------------------------------------- snapshots of rendered HTML

SNAPSHOTS = Path(__file__).parent / "snapshots"


def _snapshot_fixtures() -> dict[str, tuple[str, dict]]:
    """Small fixed pages, written by hand (no model): `{name: (kind, data)}`."""
    node = dict(token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0, clerp="", activation=1.0)
    nodes = [dict(node, node_id="E_5_0", jsNodeId="E_5-0", feature=5, layer="E", ctx_idx=0, feature_type="embedding", influence=0.5),
             dict(node, node_id="E_9_1", jsNodeId="E_9-1", feature=9, layer="E", ctx_idx=1, feature_type="embedding", influence=0.6),
             dict(node, node_id="0_3_1", jsNodeId="0_3-0", feature=3, layer="0", ctx_idx=1,
                  feature_type="cross layer transcoder", influence=0.25, activation=2.5),
             dict(node, node_id="0_0_1", jsNodeId="0_-1-1", feature=-1, layer="0", ctx_idx=1,
                  feature_type="mlp reconstruction error", influence=0.75),
             dict(node, node_id="2_7_1", jsNodeId="L_7", feature=7, layer="2", ctx_idx=1, feature_type="logit",
                  is_target_logit=True, token_prob=0.9, influence=None, clerp='Output " w7" (p=0.900)')]
    links = [dict(source="E_9_1", target="0_3_1", weight=1.5), dict(source="E_5_0", target="0_3_1", weight=-0.5),
             dict(source="0_3_1", target="2_7_1", weight=2.0), dict(source="0_0_1", target="2_7_1", weight=0.25)]
    graph = dict(metadata=dict(slug="snap", scan="test", transcoder_list=[], prompt_tokens=[" w5", " w9"], prompt=" w5 w9",
                               node_threshold=0.8, schema_version=1),
                 qParams=dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="0_3_1", sg_pos=""), nodes=nodes, links=links)
    ctx = dict(tokens=[" w1", " w2", " w3"], values=[0.0, 1.25, 0.5], maxValue=1.25, maxValueTokenIndex=1)
    feature = dict(kind="feature", index=3, layer=0, site="ln2.normalized", activations=[ctx], frac_nonzero=0.125,
                   pos_str=[" w7", " w8"], pos_values=[0.5, 0.25], neg_str=[" w2"], neg_values=[-0.75],
                   freq_hist_data_bar_heights=[3, 1], freq_hist_data_bar_values=[0.5, 1.0],
                   quantiles=[dict(label="quartile 1", activations=[dict(ctx, values=[0.0, 0.25, 0.125], maxValue=0.25)])],
                   encoder_site="ln2.normalized", decoder_site="mlp_out", enc_str=[" w9", " w4"], enc_values=[1.5, 0.75])
    pat = [[[1.0, 0.0], [0.25, 0.75]], [[1.0, 0.0], [0.5, 0.5]]]
    heads = dict(kind="heads", name="snap", tokens=[" w5", " w9"], patterns=[pat],
                 scores={"previous_token": [[0.25, 0.5]]}, ablation=dict(name="zero ablation", values=[[-0.5, 0.125]], first_layer=0))
    probes = dict(kind="probes", name="snap", metric="auroc", split="test", probe="logistic", layers=[0, 1],
                  positions=["first", "last"], values=[[0.5, 0.625], [0.75, 1.0]], best=[1, 1],
                  surface=dict(accuracy=0.625, auroc=0.6875))
    return {"graph": ("graph", graph), "feature": ("feature", feature), "heads": ("heads", heads), "probes": ("probes", probes)}


def test_rendered_html_matches_the_snapshots(tmp_path):
    """Each fixed page above, mounted with a fixed element id (`page.fragment(bundle, uid=...)`) in headless
    Chromium: the rendered DOM (`innerHTML` of the mount) equals `tests/experiments/snapshots/<name>.html`.
    After an intended change to the viewer's rendering, regenerate them with
    `INTERP_UPDATE_SNAPSHOTS=1 python -m pytest tests/experiments/test_viewer.py -k snapshots` and review the
    diff."""
    update = os.environ.get("INTERP_UPDATE_SNAPSHOTS") == "1"
    fixtures = _snapshot_fixtures()
    for kind, doc in fixtures.values():
        schema.validate(doc, kind)
    body = "".join(page.fragment(viewer.View(kind, doc, name).bundle(), uid=f"snap-{name}")
                   for name, (kind, doc) in fixtures.items())
    html = tmp_path / "snap.html"
    html.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}</body></html>")
    with Browser(_chromium()) as b:
        b.open(f"file://{html}", ready=f"document.querySelectorAll('[data-rendered]').length === {len(fixtures)}")
        got = {name: b.eval(f"document.getElementById('snap-{name}').innerHTML") for name in fixtures}
    mismatched = []
    for name, dom in got.items():
        path = SNAPSHOTS / f"{name}.html"
        dom = dom.replace("><", ">\n<") + "\n"  # one element per line: readable diffs
        if update:
            path.parent.mkdir(exist_ok=True)
            path.write_text(dom)
        elif not path.exists() or path.read_text() != dom:
            mismatched.append(name)
    assert not mismatched, (f"rendered HTML differs from tests/experiments/snapshots/ for {mismatched}; if intended, "
                            "rerun with INTERP_UPDATE_SNAPSHOTS=1 and review the diff")


@pytest.mark.parametrize("path", ["/", "/feature/{feature}", "/heads/tiny", "/probes/tiny", "/report/report"])
def test_browser_served_pages_request_nothing_outside_the_server(run, tmp_path, path):
    """Every kind of served page (the graph page has its own test above) asks only its own server: a trap proxy
    takes whatever is not for loopback and gets nothing from the page (the browser's own google.com background
    traffic carries no referer), and the server sees only the page itself and its images."""
    _chromium()
    root, out = run
    path = path.format(feature=out["features"][0].stem)
    srv, trap = server.serve_in_thread(root), server.serve_in_thread(tmp_path)
    try:
        origin = f"http://127.0.0.1:{srv.server_address[1]}"
        dom = _browse(origin + path, tmp_path, proxy=trap.server_address[1])
        assert 'data-rendered="1"' in dom and 'class="iv-missing"' not in dom
        assert [r for r in trap.requests if r[2] and r[2].startswith(origin)] == []
        hosts = {urlsplit(p if "://" in p else "//" + p).hostname for _, p, _ in trap.requests}
        assert all(h == "google.com" or h.endswith(".google.com") for h in hosts), hosts
        allowed = {path, "/favicon.ico"} | ({"/file/figures/influence.png"} if path.startswith("/report") else set())
        assert {p for _, p, _ in srv.requests} <= allowed, srv.requests
    finally:
        _stop(srv)
        _stop(trap)
