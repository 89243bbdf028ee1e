/* interp viewer: attribution graphs, feature pages, attention heads. Plain JS + SVG, no network beyond
   the local server that served the page (annotations POST). InterpViewer.mount(element, bundle). */
(function () {
  "use strict";
  if (window.InterpViewer) return;
  const NS = "http://www.w3.org/2000/svg";
  const MAX_EDGES = 4000;

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "on") for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
      else if (v !== null && v !== undefined) e.setAttribute(k, v);
    }
    for (const c of kids.flat()) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  function sv(tag, attrs, ...kids) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    for (const c of kids.flat()) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const fmt = (x) => (x === null || x === undefined ? "-" : Math.abs(x) >= 100 || x === 0 ? String(+x.toFixed(2)) : x.toPrecision(3));

  /* -------------------------------------------------------------------------------- data and links */
  function makeApp(root, bundle) {
    const served = bundle.mode === "serve";
    const app = { root, bundle };
    app.href = (kind, slug) => (served ? "/" + kind + "/" + encodeURIComponent(slug) : "#" + kind + "/" + slug);
    app.has = (kind, slug) => (bundle.index[kind] || []).some((r) => r.slug === slug);
    app.data = (kind, slug) => (bundle[kind] || {})[slug];
    app.save = function (slug, doc) {
      bundle.annotations = bundle.annotations || {};
      bundle.annotations[slug] = doc;
      if (!served) return Promise.resolve("kept in this page (exported file: read-only)");
      return fetch("/api/annotations/" + encodeURIComponent(slug), {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(doc),
      }).then((r) => (r.ok ? "saved" : "save failed: " + r.status));
    };
    return app;
  }

  function route(app) {
    const h = decodeURIComponent((location.hash || "").replace(/^#/, ""));
    const r = h ? h : app.bundle.route || "index";
    const [kind, slug, ...rest] = r.split("/");
    return [kind, slug || "", rest.join("/")];
  }

  function render(app) {
    const [kind, slug, clicked] = route(app);
    app.clicked = clicked;
    const root = app.root;
    root.replaceChildren();
    const nav = el("div", { class: "iv-nav" }, el("a", { href: app.bundle.mode === "serve" ? "/" : "#index" }, "index"),
      el("span", {}, kind === "index" ? "" : " / " + kind + " / " + slug));
    if (!app.bundle.embedded) root.append(nav);
    const page = { index: indexPage, graph: graphPage, feature: featurePage, heads: headsPage, probes: probesPage, report: reportPage }[kind];
    const data = kind === "index" ? app.bundle.index : app.data(kind, slug);
    if (!page || data === undefined) root.append(el("p", { class: "iv-missing" }, "nothing named " + kind + "/" + slug));
    else root.append(page(app, data, slug));
  }

  /* -------------------------------------------------------------------------------- index */
  function indexPage(app, index) {
    const box = el("div", { class: "iv-index" });
    if ((index.feature || []).length || app.bundle.mode === "serve") box.append(searchBox(app));
    for (const kind of ["graph", "feature", "heads", "probes", "report"]) {
      const rows = index[kind] || [];
      box.append(el("h2", {}, kind + "s (" + rows.length + ")"));
      box.append(el("ul", {}, rows.map((r) =>
        el("li", {}, el("a", { href: app.href(kind, r.slug), "data-link": kind + "/" + r.slug }, r.slug),
          r.title !== r.slug ? el("span", { class: "iv-dim" }, "  " + r.title) : null))));
    }
    return box;
  }

  /* -------------------------------------------------------------------------------- feature search */
  function searchContexts(docs, q) {  // data.search_contexts, over the pages inlined in an exported file
    const needle = q.toLowerCase(), out = [];
    if (!needle) return out;
    for (const [slug, doc] of Object.entries(docs)) {
      let best = null;
      const ctxs = [...(doc.activations || []), ...(doc.quantiles || []).flatMap((b) => b.activations)];
      for (const c of ctxs) {
        const text = c.tokens.join("").toLowerCase(), starts = [0];
        for (const t of c.tokens) starts.push(starts[starts.length - 1] + t.length);
        for (let at = text.indexOf(needle); at >= 0; at = text.indexOf(needle, at + 1)) {
          let i = -1;
          for (let j = 0; j < c.tokens.length; j++)
            if (starts[j] < at + needle.length && starts[j + 1] > at && (i < 0 || c.values[j] > c.values[i])) i = j;
          if (!best || c.values[i] > best.score)
            best = { slug, layer: doc.layer, index: doc.index, score: c.values[i], token: c.tokens[i], context: c.tokens.join("") };
        }
      }
      if (best) out.push(best);
    }
    out.sort((a, b) => b.score - a.score || (a.slug < b.slug ? -1 : a.slug > b.slug ? 1 : 0));
    return out.slice(0, 50);
  }

  function searchBox(app) {
    const input = el("input", { type: "search", class: "iv-search", placeholder: "text snippet", "aria-label": "search features" });
    const info = el("span", { class: "iv-search-mode iv-dim" }), results = el("ol", { class: "iv-search-results" });
    function show(r) {
      info.textContent = " " + r.results.length + " features (" + (r.mode === "model" ? "activations on the snippet" : "stored contexts") + ")";
      results.replaceChildren(...r.results.map((x) => el("li", { "data-slug": x.slug },
        app.has("feature", x.slug) ? el("a", { href: app.href("feature", x.slug), "data-link": "feature/" + x.slug }, "feature " + x.slug) : el("span", {}, "feature " + x.slug),
        el("span", { class: "iv-dim" }, "  " + fmt(x.score) + " on " + JSON.stringify(x.token) + (x.pos !== undefined ? " @" + x.pos : "")),
        x.context ? el("div", { class: "iv-ctx iv-dim" }, x.context) : null)));
    }
    function go() {
      const q = input.value;
      if (app.bundle.mode !== "serve") return show({ mode: "contexts", results: searchContexts(app.bundle.feature || {}, q) });
      info.textContent = " searching...";
      fetch("/api/search?q=" + encodeURIComponent(q)).then((r) => r.json()).then((r) => (r.error ? (info.textContent = " " + r.error) : show(r)),
        (e) => (info.textContent = " " + e));
    }
    input.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
    return el("div", { class: "iv-searchbox" }, el("h2", {}, "feature search"),
      el("div", { class: "iv-controls" }, input, el("button", { class: "iv-search-go", on: { click: go } }, "search"), info), results);
  }

  /* -------------------------------------------------------------------------------- attribution graph */
  function rowOf(n, L) {
    if (n.feature_type === "embedding") return 0;
    if (n.feature_type === "logit") return L + 2;
    return +n.layer + 1;
  }

  function graphPage(app, g, slug) {
    const ann = Object.assign({ labels: {}, pinnedIds: [], supernodes: [] }, (app.bundle.annotations || {})[slug] || {});
    const nodes = g.nodes, byId = new Map(nodes.map((n) => [n.node_id, n]));
    const links = g.links.filter((l) => byId.has(l.source) && byId.has(l.target));
    const layers = nodes.filter((n) => !["embedding", "logit"].includes(n.feature_type)).map((n) => +n.layer);
    const L = layers.length ? Math.max(...layers) : 0;
    const T = Math.max(g.metadata.prompt_tokens.length, ...nodes.map((n) => n.ctx_idx + 1));
    const thresholds = nodes.map((n) => n.influence).filter((x) => typeof x === "number");
    const tMax = thresholds.length ? Math.max(...thresholds) : 1;
    const state = { t: tMax, clicked: app.clicked || (g.qParams && g.qParams.clickedId) || "", selected: new Set() };

    const wrap = el("div", { class: "iv-graph", "data-slug": slug });
    const status = el("span", { class: "iv-status" });
    const slider = el("input", { type: "range", min: 0, max: 1000, value: 1000, class: "iv-prune", "aria-label": "pruning" });
    const count = el("span", { class: "iv-count" });
    wrap.append(el("h2", {}, g.metadata.prompt || slug),
      el("div", { class: "iv-controls" }, el("label", {}, "node influence threshold ", slider), count, status));
    const svgBox = el("div", { class: "iv-svgbox" });
    const panel = el("div", { class: "iv-panel" });
    wrap.append(el("div", { class: "iv-row" }, svgBox, panel));

    let drawn = false;
    function visible() {
      return nodes.filter((n) => n.feature_type === "embedding" || n.feature_type === "logit" ||
        typeof n.influence !== "number" || n.influence <= state.t + 1e-12);
    }
    function name(id) {  // a node's label, else its clerp / token, else its id
      const n = byId.get(id);
      if (ann.labels[id]) return ann.labels[id];
      if (n && n.clerp) return n.clerp;
      if (n && n.feature_type === "embedding") return "token " + JSON.stringify(g.metadata.prompt_tokens[n.ctx_idx] || "") + " @" + n.ctx_idx;
      return id;
    }
    function groupOf(id) {
      for (const s of ann.supernodes) if (s.slice(1).includes(id)) return s[0];
      return null;
    }

    function draw() {
      const vis = visible(), shown = new Set(vis.map((n) => n.node_id));
      const cells = new Map();
      for (const n of vis) {
        const k = rowOf(n, L) + ":" + n.ctx_idx;
        if (!cells.has(k)) cells.set(k, []);
        cells.get(k).push(n);
      }
      const most = new Array(T).fill(1);  // each position's width: its fullest cell
      for (const c of cells.values()) most[c[0].ctx_idx] = Math.max(most[c[0].ctx_idx], c.length);
      const colWs = most.map((m) => Math.max(36, 13 * m + 12)), rowH = 46, left = 40, top = 90;
      const colX = colWs.map((_, p) => left + colWs.slice(0, p).reduce((a, b) => a + b, 0));
      const W = left + colWs.reduce((a, b) => a + b, 0) + 60, H = top + (L + 3) * rowH + 40;
      const pos = new Map();
      for (const c of cells.values()) {
        c.sort((a, b) => (a.feature_type > b.feature_type ? 1 : -1) || a.feature - b.feature);
        c.forEach((n, i) => {
          const x = colX[n.ctx_idx] + colWs[n.ctx_idx] / 2 + (i - (c.length - 1) / 2) * 13;
          const y = top + (L + 2 - rowOf(n, L)) * rowH + rowH / 2;
          pos.set(n.node_id, [x, y]);
        });
      }
      let es = links.filter((l) => shown.has(l.source) && shown.has(l.target));
      if (es.length > MAX_EDGES) es = es.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, MAX_EDGES);
      const wMax = Math.max(1e-12, ...es.map((l) => Math.abs(l.weight)));
      const svg = sv("svg", { width: W, height: H, class: "iv-svg", viewBox: "0 0 " + W + " " + H });
      for (let r = 0; r <= L + 2; r++) {
        const y = top + (L + 2 - r) * rowH + rowH / 2;
        svg.append(sv("text", { x: 4, y: y + 4, class: "iv-axis" }, r === 0 ? "E" : r === L + 2 ? "logit" : "L" + (r - 1)));
      }
      g.metadata.prompt_tokens.forEach((tok, p) =>
        svg.append(sv("text", { x: colX[p] + colWs[p] / 2, y: H - 14, class: "iv-tok", "text-anchor": "middle" }, JSON.stringify(tok).slice(1, -1))));
      const eg = sv("g", { class: "iv-edges" });
      for (const l of es) {
        const [x1, y1] = pos.get(l.source), [x2, y2] = pos.get(l.target);
        eg.append(sv("line", {
          x1, y1, x2, y2, "data-source": l.source, "data-target": l.target,
          class: "iv-edge " + (l.weight > 0 ? "pos" : "neg"), "stroke-width": (0.3 + 3 * Math.abs(l.weight) / wMax).toFixed(2),
        }));
      }
      svg.append(eg);
      const ng = sv("g", { class: "iv-nodes" });
      for (const n of vis) {
        const [x, y] = pos.get(n.node_id);
        const grp = groupOf(n.node_id);
        const c = sv("circle", {
          cx: x.toFixed(1), cy: y.toFixed(1), r: n.feature_type === "logit" ? 7 : 5, "data-node": n.node_id,
          class: "iv-node t-" + n.feature_type.replace(/ /g, "-") + (ann.pinnedIds.includes(n.node_id) ? " pinned" : "") +
            (grp ? " grouped" : "") + (state.selected.has(n.node_id) ? " selected" : ""),
        }, sv("title", {}, name(n.node_id) + " [" + n.feature_type + "] influence " + fmt(n.influence)));
        c.addEventListener("click", (ev) => onClick(n, ev));
        c.addEventListener("mouseenter", () => highlight(n.node_id));
        c.addEventListener("mouseleave", () => highlight());
        ng.append(c);
        const label = ann.labels[n.node_id] || (n.feature_type === "logit" ? n.clerp.replace(/^Output /, "") : "");
        if (label) ng.append(sv("text", { x: x + 4, y: y - 9, class: "iv-label", transform: "rotate(-60 " + (x + 4) + " " + (y - 9) + ")" }, label));
      }
      svg.append(ng);
      svgBox.replaceChildren(svg);
      count.textContent = " " + vis.length + " nodes, " + es.length + " edges";
      highlight();
      const at = pos.get(state.clicked);
      if (at && !drawn) setTimeout(() => (svgBox.scrollLeft = Math.max(0, at[0] - 300)), 0);  // clicked node in view
      drawn = true;
    }

    const into = new Map(), out = new Map();
    for (const l of links) {
      if (!into.has(l.target)) into.set(l.target, []);
      if (!out.has(l.source)) out.set(l.source, []);
      into.get(l.target).push(l.source);
      out.get(l.source).push(l.target);
    }
    function reach(id, next) {  // every node on a path from (or to) `id`
      const seen = new Set([id]), todo = [id];
      while (todo.length) for (const m of next.get(todo.pop()) || []) if (!seen.has(m)) { seen.add(m); todo.push(m); }
      return seen;
    }
    function highlight(id = state.clicked) {
      const up = id ? reach(id, into) : null, down = id ? reach(id, out) : null;
      svgBox.querySelectorAll(".iv-edge").forEach((e) => {
        const s = e.dataset.source, t = e.dataset.target;
        const direct = id && (s === id || t === id);
        const path = id && ((up.has(s) && up.has(t)) || (down.has(s) && down.has(t)));
        e.classList.toggle("hl", !!direct);
        e.classList.toggle("path", !!path && !direct);
        e.classList.toggle("dim", !!id && !path);
      });
      svgBox.querySelectorAll(".iv-node").forEach((c) => {
        c.classList.toggle("clicked", c.dataset.node === state.clicked);
        c.classList.toggle("onpath", !!id && (up.has(c.dataset.node) || down.has(c.dataset.node)));
      });
    }

    function onClick(n, ev) {
      if (ev && ev.shiftKey) {
        state.selected.has(n.node_id) ? state.selected.delete(n.node_id) : state.selected.add(n.node_id);
      } else state.clicked = n.node_id;
      draw();
      showPanel(n);
    }

    function persist() {
      status.textContent = " saving...";
      app.save(slug, ann).then((m) => (status.textContent = " " + m), (e) => (status.textContent = " " + e));
    }

    function showPanel(n) {
      panel.replaceChildren();
      if (n) {
        const parts = n.node_id.split("_");
        const fslug = n.feature_type === "cross layer transcoder" ? parts[0] + "_" + parts[1] : null;
        const input = el("input", { type: "text", class: "iv-label-input", value: ann.labels[n.node_id] || "", placeholder: "label" });
        const inE = links.filter((l) => l.target === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
        const outE = links.filter((l) => l.source === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
        const edgeList = (es, key) => el("ul", {}, es.map((l) => el("li", {}, el("a", {
          href: "#", on: { click: (e) => { e.preventDefault(); const m = byId.get(l[key]); state.clicked = m.node_id; draw(); showPanel(m); } },
        }, name(l[key])), " " + fmt(l.weight))));
        panel.append(
          el("h3", {}, n.node_id), el("div", { class: "iv-dim" }, n.feature_type + (n.clerp ? ": " + n.clerp : "")),
          el("div", {}, "layer " + n.layer + ", position " + n.ctx_idx + ", influence " + fmt(n.influence) + ", activation " + fmt(n.activation)),
          fslug && app.has("feature", fslug) ? el("a", { href: app.href("feature", fslug), class: "iv-open-feature", "data-link": "feature/" + fslug }, "open feature " + fslug) : null,
          el("div", {}, input, el("button", { class: "iv-save", on: { click: () => { ann.labels[n.node_id] = input.value; if (!input.value) delete ann.labels[n.node_id]; draw(); showPanel(n); persist(); } } }, "save label"),
            el("button", { on: { click: () => { const i = ann.pinnedIds.indexOf(n.node_id); i < 0 ? ann.pinnedIds.push(n.node_id) : ann.pinnedIds.splice(i, 1); draw(); persist(); } } }, "pin")),
          el("h4", {}, "strongest inputs"), edgeList(inE, "source"), el("h4", {}, "strongest outputs"), edgeList(outE, "target"));
      }
      const groupName = el("input", { type: "text", placeholder: "supernode name", class: "iv-group-name" });
      panel.append(el("h4", {}, "supernodes (shift-click nodes to select: " + state.selected.size + ")"),
        el("div", {}, groupName, el("button", { on: { click: () => {
          if (!state.selected.size) return;
          ann.supernodes.push([groupName.value || "group " + (ann.supernodes.length + 1), ...state.selected]);
          state.selected.clear(); draw(); showPanel(n); persist();
        } } }, "group")),
        el("ul", {}, ann.supernodes.map((s, i) => el("li", {}, s[0] + " (" + (s.length - 1) + ") ",
          el("button", { on: { click: () => { ann.supernodes.splice(i, 1); draw(); showPanel(n); persist(); } } }, "ungroup")))));
    }

    let pending = false;  // at most one redraw per frame while the slider moves (large graphs)
    slider.addEventListener("input", () => {
      state.t = tMax * slider.value / 1000;
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); }
    });
    draw();
    showPanel(state.clicked && byId.get(state.clicked));
    return wrap;
  }

  /* -------------------------------------------------------------------------------- feature dashboard */
  function tokens(toks, vals, max, hot) {
    return el("span", { class: "iv-ctx" }, toks.map((t, i) => el("span", {
      class: "iv-t" + (i === hot ? " hot" : ""), title: fmt(vals[i]),
      style: "background: rgba(255, 140, 0, " + Math.max(0, Math.min(1, vals[i] / (max || 1))).toFixed(3) + ")",
    }, t)));
  }

  function featurePage(app, f, slug) {
    const box = el("div", { class: "iv-feature", "data-slug": slug });
    box.append(el("h2", {}, "feature " + f.index + (f.layer !== null && f.layer !== undefined ? " (layer " + f.layer + ", " + f.site + ")" : "")),
      el("div", {}, "firing frequency: " + (f.frac_nonzero === null ? "-" : (100 * f.frac_nonzero).toPrecision(3) + "%")));
    const eff = (strs, vals, cls) => el("table", { class: "iv-effects " + cls }, strs.map((s, i) => el("tr", {}, el("td", { class: "iv-t" }, JSON.stringify(s).slice(1, -1)), el("td", {}, fmt(vals[i])))));
    const logits = [el("div", {}, el("h4", {}, "promoted logits"), eff(f.pos_str, f.pos_values, "pos")),
      el("div", {}, el("h4", {}, "suppressed logits"), eff(f.neg_str, f.neg_values, "neg"))];
    if (f.enc_str) {  // a transcoder: what its encoder reads, what its decoder writes
      box.append(el("div", { class: "iv-row" },
        el("div", { class: "iv-reads" }, el("h3", {}, "reads (encoder, " + f.encoder_site + ")"),
          el("h4", {}, "top tokens through the embedding"), eff(f.enc_str, f.enc_values, "pos"),
          el("div", { class: "iv-dim" }, "and the top activating contexts below")),
        el("div", { class: "iv-writes" }, el("h3", {}, "writes (decoder, " + f.decoder_site + ")"), el("div", { class: "iv-row" }, logits))));
    } else box.append(el("div", { class: "iv-row" }, logits));
    const hs = f.freq_hist_data_bar_heights || [], xs = f.freq_hist_data_bar_values || [];
    if (hs.length) {
      const hMax = Math.max(...hs, 1), bw = Math.max(4, Math.floor(360 / hs.length)), H = 80;
      box.append(el("h4", {}, "activation histogram (nonzero, " + hs.reduce((a, b) => a + b, 0) + " tokens)"),
        sv("svg", { width: bw * hs.length + 60, height: H + 18, class: "iv-svg iv-hist" },
          hs.map((h, i) => sv("rect", { x: i * bw, y: H - (H * h) / hMax, width: bw - 1, height: (H * h) / hMax, class: "iv-bar" },
            sv("title", {}, fmt(xs[i]) + ": " + h))),
          sv("text", { x: 0, y: H + 14, class: "iv-axis" }, fmt(xs[0])),
          sv("text", { x: bw * hs.length, y: H + 14, class: "iv-axis", "text-anchor": "end" }, fmt(xs[xs.length - 1]))));
    }
    const top = f.activations.length ? f.activations[0].maxValue : 1;
    const list = (acts, cls) => el("ol", { class: cls }, acts.map((a) => el("li", { "data-max": a.maxValue },
      el("span", { class: "iv-dim" }, fmt(a.maxValue) + "  "), tokens(a.tokens, a.values, top, a.maxValueTokenIndex))));
    box.append(el("h4", {}, "top activating contexts"), list(f.activations, "iv-contexts"));
    for (const q of (f.quantiles || []).slice().reverse()) {
      if (q.activations.length) box.append(el("h4", {}, "samples from " + q.label), list(q.activations, "iv-quantile"));
    }
    return box;
  }

  /* -------------------------------------------------------------------------------- attention heads */
  function headsPage(app, d, slug) {
    const L = d.patterns.length, H = d.patterns[0].length, T = d.tokens.length;
    const st = { l: 0, h: 0, q: T - 1 };
    const want = /^(\d+)\.(\d+)$/.exec(app.clicked || "");  // heads/<slug>/<layer>.<head> opens that head
    if (want && +want[1] < L && +want[2] < H) { st.l = +want[1]; st.h = +want[2]; }
    const box = el("div", { class: "iv-heads", "data-slug": slug });
    const grid = el("div", { class: "iv-pattern" }), toks = el("div", { class: "iv-ctx iv-hover" });
    const title = el("h3");
    function pick(l, h) { st.l = l; st.h = h; draw(); }
    const tables = Object.entries(d.scores).map(([name, m]) => {
      const mx = Math.max(1e-9, ...m.flat().map(Math.abs));
      return el("div", { class: "iv-score" }, el("h4", {}, name), el("table", {}, el("tr", {}, el("th", {}, "L\\H"), [...Array(H).keys()].map((h) => el("th", {}, h))),
        m.map((row, l) => el("tr", {}, el("th", {}, l), row.map((v, h) => el("td", {
          class: "iv-cell", title: "L" + l + "H" + h + " " + name + " " + fmt(v), "data-head": l + "." + h,
          style: "background: rgba(60, 120, 220, " + (Math.abs(v) / mx).toFixed(3) + ")", on: { click: () => pick(l, h) },
        }, fmt(v)))))));
    });
    function draw() {
      const p = d.patterns[st.l][st.h], cs = Math.max(8, Math.min(28, Math.floor(480 / T)));
      title.textContent = "layer " + st.l + ", head " + st.h + " (hover a query token)";
      const svg = sv("svg", { width: T * cs + 2, height: T * cs + 2, class: "iv-svg" });
      for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
        if (k > q && !(p[q][k] > 0)) continue;
        svg.append(sv("rect", { x: k * cs, y: q * cs, width: cs - 1, height: cs - 1, "data-q": q, "data-k": k,
          style: "fill: rgba(220, 60, 40, " + p[q][k].toFixed(3) + ")" }, sv("title", {}, d.tokens[q] + " -> " + d.tokens[k] + ": " + fmt(p[q][k]))));
      }
      grid.replaceChildren(svg);
      sels.forEach((x) => (x.value = st[x.dataset.key]));
      toks.replaceChildren(...d.tokens.map((t, i) => el("span", {
        class: "iv-t" + (i === st.q ? " hot" : ""), "data-pos": i, title: "attention from " + d.tokens[st.q] + ": " + fmt(p[st.q][i]),
        style: "background: rgba(220, 60, 40, " + p[st.q][i].toFixed(3) + ")", on: { mouseenter: () => { st.q = i; draw(); } },
      }, t)));
    }
    const sel = (n, key, lab) => el("select", { "data-key": key, on: { change: (e) => { st[key] = +e.target.value; draw(); } } }, [...Array(n).keys()].map((i) => el("option", { value: i }, lab + i)));
    const sels = [sel(L, "l", "layer "), sel(H, "h", "head ")];
    box.append(el("h2", {}, "attention heads: " + (d.name || slug)));
    if (d.ablation) box.append(ablationMap(d.ablation, H, pick));
    box.append(el("div", { class: "iv-controls" }, sels), title, toks, grid, el("div", { class: "iv-row" }, tables));
    draw();
    return box;
  }

  function ablationMap(a, H, pick) {  // layer x head effects of ablating each head; a click opens its pattern
    const v = a.values, first = a.first_layer || 0, cs = 26, left = 34, top = 18;
    const mx = Math.max(1e-12, ...v.flat().map(Math.abs));
    const svg = sv("svg", { width: left + H * cs + 4, height: top + v.length * cs + 4, class: "iv-svg iv-ablation" });
    for (let h = 0; h < H; h++) svg.append(sv("text", { x: left + h * cs + cs / 2, y: 12, class: "iv-axis", "text-anchor": "middle" }, "H" + h));
    v.forEach((row, i) => {
      const l = first + i;
      svg.append(sv("text", { x: 2, y: top + i * cs + cs / 2 + 4, class: "iv-axis" }, "L" + l));
      row.forEach((x, h) => {
        const c = sv("rect", { x: left + h * cs, y: top + i * cs, width: cs - 2, height: cs - 2, class: "iv-abl-cell", "data-head": l + "." + h,
          style: "fill: " + (x >= 0 ? "rgba(42, 111, 219, " : "rgba(217, 65, 43, ") + (Math.abs(x) / mx).toFixed(3) + ")" },
        sv("title", {}, "L" + l + "H" + h + " " + a.name + ": " + fmt(x)));
        c.addEventListener("click", () => pick(l, h));
        svg.append(c);
      });
    });
    return el("div", { class: "iv-ablation-box" }, el("h4", {}, a.name + " (click a head for its pattern)"), svg);
  }

  /* -------------------------------------------------------------------------------- probe grid */
  function probesPage(app, d, slug) {
    const v = d.values, P = d.positions.length, cs = 34, left = 44, top = 70;
    const s = d.surface, base = s ? s.auroc : null;
    const box = el("div", { class: "iv-probes", "data-slug": slug });
    box.append(el("h2", {}, d.name + ": " + d.probe + " probe " + d.metric + " (" + d.split + ")"),
      el("div", { class: "iv-surface" }, s ? "surface-only baseline on the same split: " + d.metric + " " + fmt(base) + ", accuracy " + fmt(s.accuracy) +
        "; cells above it are outlined" : "no surface baseline"),
      el("div", {}, "best cell (by validation): layer " + d.layers[d.best[0]] + ", position " + d.positions[d.best[1]] + ": " + fmt(v[d.best[0]][d.best[1]])));
    const W = left + P * cs + 110, H = top + v.length * cs + 10;
    const svg = sv("svg", { width: W, height: H, class: "iv-svg iv-probe-grid" });
    d.positions.forEach((p, j) => svg.append(sv("text", { x: left + j * cs + cs / 2, y: top - 6, class: "iv-axis",
      transform: "rotate(-45 " + (left + j * cs + cs / 2) + " " + (top - 6) + ")" }, p)));
    v.forEach((row, i) => {
      svg.append(sv("text", { x: 2, y: top + i * cs + cs / 2 + 4, class: "iv-axis" }, "L" + d.layers[i]));
      row.forEach((x, j) => {
        const t = Math.max(0, Math.min(1, (x - 0.5) * 2));  // AUROC 0.5 (chance) .. 1
        svg.append(sv("rect", { x: left + j * cs, y: top + i * cs, width: cs - 2, height: cs - 2, "data-cell": i + "." + j,
          class: "iv-probe-cell" + (base !== null && x > base ? " above" : "") + (i === d.best[0] && j === d.best[1] ? " best" : ""),
          style: "fill: rgba(38, 162, 105, " + t.toFixed(3) + ")" }, sv("title", {}, "layer " + d.layers[i] + ", " + d.positions[j] + ": " + fmt(x))));
        svg.append(sv("text", { x: left + j * cs + cs / 2 - 1, y: top + i * cs + cs / 2 + 3, class: "iv-axis", "text-anchor": "middle" }, x.toFixed(2)));
      });
    });
    if (base !== null) {  // the baseline beside the grid, on the same colour scale
      const x0 = left + P * cs + 16, t = Math.max(0, Math.min(1, (base - 0.5) * 2));
      svg.append(sv("rect", { x: x0, y: top, width: cs - 2, height: cs - 2, class: "iv-surface-cell", style: "fill: rgba(38, 162, 105, " + t.toFixed(3) + ")" },
        sv("title", {}, "surface baseline: " + fmt(base))),
      sv("text", { x: x0 + cs / 2 - 1, y: top + cs / 2 + 3, class: "iv-axis", "text-anchor": "middle" }, base.toFixed(2)),
      sv("text", { x: x0, y: top - 6, class: "iv-axis" }, "surface"));
    }
    box.append(svg);
    return box;
  }

  function reportPage(app, text, slug) {  // markdown: headings, paragraphs, lists, code blocks, figures
    const row = (app.bundle.index.report || []).find((r) => r.slug === slug) || { path: "" };
    const dir = row.path.includes("/") ? row.path.slice(0, row.path.lastIndexOf("/") + 1) : "";
    const src = (ref) => {
      const rel = (dir + ref).replace(/(^|\/)\.\//g, "$1");
      const files = app.bundle.files || {};
      return files[rel] || (app.bundle.mode === "serve" ? "/file/" + rel.split("/").map(encodeURIComponent).join("/") : "");
    };
    const box = el("div", { class: "iv-report", "data-slug": slug });
    let list = null, code = null;
    for (const line of text.split("\n")) {
      if (code) { if (line.startsWith("```")) { box.append(code); code = null; } else code.append(line + "\n"); continue; }
      if (line.startsWith("```")) { code = el("pre"); continue; }
      const h = line.match(/^(#{1,4})\s+(.*)$/), li = line.match(/^\s*[-*]\s+(.*)$/), img = line.match(/!\[([^\]]*)\]\(([^)\s]+)\)/);
      if (!li) list = null;
      if (h) box.append(el("h" + (h[1].length + 1), {}, h[2]));
      else if (img && !/^(https?:|data:|\/)/.test(img[2])) box.append(el("figure", {}, el("img", { src: src(img[2]), alt: img[1], class: "iv-figure" }), el("figcaption", {}, img[1])));
      else if (li) { if (!list) box.append((list = el("ul"))); list.append(el("li", {}, li[1])); }
      else if (line.trim()) box.append(el("p", {}, line));
    }
    if (code) box.append(code);
    return box;
  }

  window.InterpViewer = {
    mount: function (root, bundle) {
      const app = makeApp(root, bundle), t0 = performance.now();
      render(app);
      root.setAttribute("data-render-ms", (performance.now() - t0).toFixed(1));  // the render itself
      root.setAttribute("data-ready-ms", performance.now().toFixed(1));  // since navigation started
      if (!bundle.embedded) window.addEventListener("hashchange", () => render(app));
      root.setAttribute("data-rendered", "1");
      return app;
    },
  };
})();
