// geomap reports: the journey page's layer picker, head grid, decoding controls, sampling and map hover.
// No network, no libraries; every number comes from the JSON block the page embeds.
(function () {
  "use strict";
  var node = document.getElementById("geomap-data");
  var data = node ? JSON.parse(node.textContent || "{}") : {};
  var SVG = "http://www.w3.org/2000/svg";

  function fixed(x, digits) { return (Math.round(x * Math.pow(10, digits)) / Math.pow(10, digits)).toFixed(digits); }
  // The same display rule as the Python side (render.fmt): "–" for missing, %g for tiny or huge values.
  function fmt(x, digits) {
    if (x === null || x === undefined || x !== x) { return "–"; }
    var v = Number(x);
    if (digits === 0 && Math.abs(v) < 1e15) { return Math.round(v).toLocaleString("en-US"); }
    if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < Math.pow(10, -digits))) {
      return Number(v.toPrecision(Math.max(digits, 1))).toString();
    }
    return v.toFixed(digits);
  }
  function showtok(t) {
    if (t === null || t === undefined) { return "?"; }
    if (t.trim()) { return t; }
    return t.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205";
  }
  function heat(x) {
    var v = Math.max(0, Math.min(1, Number(x) || 0));
    return "background:hsl(215,70%," + Math.round(97 - 55 * v) + "%);color:" + (v > 0.6 ? "#fff" : "#111");
  }
  function lookup(root, path) {
    return path.split(".").reduce(function (o, k) { return o === null || o === undefined ? undefined : o[k]; }, root);
  }
  function tokNode(text) {
    var b = document.createElement("bdi"); b.className = "tok"; b.textContent = showtok(text); return b;
  }

  // ---------------------------------------------------------------- decoding -------------------------------
  // transformers' order: temperature, then top-k, then top-p over the renormalised survivors. The listed logits
  // are exact; the unlisted ones come as bins (count, mean logit) and behave as equal tokens inside a bin.
  function decode(T, k, p) {
    var dec = data.decoding, top = dec.top, z0 = top[0].logit, i, items = [];
    for (i = 0; i < top.length; i++) { items.push({n: 1, e: Math.exp((top[i].logit - z0) / T), rank: i}); }
    var tail = dec.tail;
    if (tail) {
      for (i = 0; i < tail.n.length; i++) { items.push({n: tail.n[i], e: Math.exp((tail.m[i] - z0) / T), bin: i}); }
    } else if (dec.unlisted > 0) {
      // Only the total unlisted mass at T = 1 is known: it is spread as one equal logit (an estimate).
      var seen = 0; for (i = 0; i < top.length; i++) { seen += Math.exp(top[i].logit - dec.logsumexp); }
      var rest = Math.max(0, 1 - seen);
      if (rest > 0) {
        var zbar = dec.logsumexp + Math.log(rest / dec.unlisted);
        items.push({n: dec.unlisted, e: Math.exp((zbar - z0) / T), bin: 0, estimate: true});
      }
    }
    var kept = [], left = k > 0 ? k : Infinity;
    for (i = 0; i < items.length && left > 0; i++) {
      var c = Math.min(items[i].n, left); left -= c;
      kept.push({item: items[i], count: c});
    }
    var total = 0, all = 0;
    for (i = 0; i < items.length; i++) { all += items[i].n * items[i].e; }
    for (i = 0; i < kept.length; i++) { total += kept[i].count * kept[i].item.e; }
    if (p < 1) {
      var before = 0, out = [];
      for (i = 0; i < kept.length && before < p; i++) {
        var per = kept[i].item.e / total, cnt = kept[i].count;
        if (cnt > 1) { cnt = Math.min(cnt, Math.max(1, Math.ceil((p - before) / per - 1e-12))); }
        out.push({item: kept[i].item, count: cnt}); before += cnt * per;
      }
      kept = out; total = 0;
      for (i = 0; i < kept.length; i++) { total += kept[i].count * kept[i].item.e; }
    }
    var probs = [], nKept = 0, listedKept = 0;
    for (i = 0; i < top.length; i++) { probs.push(0); }
    for (i = 0; i < kept.length; i++) {
      nKept += kept[i].count;
      if (kept[i].item.rank !== undefined) { probs[kept[i].item.rank] = kept[i].item.e / total; listedKept++; }
    }
    return {probs: probs, model: items.slice(0, top.length).map(function (it) { return it.e / all; }),
            kept: nKept, listedKept: listedKept, massKept: total / all, parts: kept, total: total,
            estimate: !tail && dec.unlisted > 0};
  }
  window.geomapDecode = decode;

  function mulberry32(seed) {
    var a = seed >>> 0;
    return function () {
      a = (a + 0x6D2B79F5) >>> 0;
      var t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }
  function draw(result, seed) {
    var u = mulberry32(seed)(), acc = 0, i, rank = 0;
    for (i = 0; i < result.parts.length; i++) {
      var part = result.parts[i], mass = part.count * part.item.e / result.total;
      if (u < acc + mass || i === result.parts.length - 1) {
        if (part.item.rank !== undefined) { return {u: u, rank: part.item.rank, p: part.item.e / result.total}; }
        return {u: u, rank: rank + Math.min(part.count - 1, Math.floor((u - acc) / (mass / part.count))), unlisted: true,
                bin: part.item.bin, estimate: !!part.item.estimate, p: part.item.e / result.total};
      }
      acc += mass; rank += part.count;
    }
    return {u: u, rank: 0};
  }
  window.geomapDraw = function (T, k, p, seed) { return named(draw(decode(T, k, p), seed)); };

  // The drawn token's id and text: a listed rank's own; in a bin of the tail, the member the page names for it
  // (decoding_view.tail_summary: the page treats a bin's tokens as equally likely).
  function named(d) {
    var dec = data.decoding, top = dec.top;
    if (d.rank < top.length && !d.unlisted) { d.id = top[d.rank].id; d.token = top[d.rank].token; return d; }
    var tail = dec.tail;
    if (tail && tail.r && d.bin !== undefined && !d.estimate) {
      d.id = tail.r[d.bin]; d.token = tail.t ? tail.t[d.bin] : null; d.binCount = tail.n[d.bin];
    }
    return d;
  }
  window.geomapNamed = named;

  // The kept distribution as a chart: the top tokens, the drawn one (named, wherever it ranks) and the rest's mass.
  function distChart(res, drawn) {
    var svg = document.querySelector("[data-dist-chart]"); if (!svg) { return; }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var top = data.decoding.top, n = Math.min(15, top.length), bars = [], i, shown = 0;
    for (i = 0; i < n; i++) {
      bars.push({label: showtok(top[i].token), p: res.probs[i], kind: res.probs[i] > 0 ? "kept" : "cut", rank: i + 1,
                 drawn: drawn !== null && drawn.rank === i});
      shown += res.probs[i];
    }
    if (drawn !== null && drawn.rank >= n) {
      bars.push({label: drawn.token === undefined || drawn.token === null ? "rank " + (drawn.rank + 1) : showtok(drawn.token),
                 p: drawn.p, kind: "kept", rank: drawn.rank + 1, drawn: true});
      shown += drawn.p;
    }
    bars.push({label: "other tokens", p: Math.max(0, 1 - shown), kind: "tail", rank: null});  // short: labels cut at 14
    var W = 760, H = 250, x0 = 56, y0 = 10, pw = W - x0 - 10, ph = 150;
    var peak = Math.max.apply(null, bars.map(function (b) { return b.p; }).concat([1e-12]));
    var step = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1].filter(function (s) { return s * 4 >= peak; })[0] || 1;
    var ymax = Math.min(1, Math.ceil(peak / step - 1e-9) * step) || step;
    function el(name, attrs, text, parent) {
      var e = document.createElementNS(SVG, name);
      Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
      if (text !== undefined) { e.textContent = text; }
      (parent || svg).appendChild(e); return e;
    }
    el("rect", {x: x0, y: y0, width: pw, height: ph, "class": "frame"});
    for (var v = 0; v <= ymax + 1e-9; v += step) {
      var y = y0 + ph - v / ymax * ph;
      el("line", {x1: x0 - 4, x2: x0 + pw, y1: y, y2: y, "class": "grid"});
      el("text", {x: x0 - 6, y: y + 3, "text-anchor": "end", "class": "ticklabel"}, fmt(v, step < 0.01 ? 3 : 2));
    }
    el("text", {x: 12, y: y0 + ph / 2, "text-anchor": "middle", "class": "axislabel", transform: "rotate(-90 12 " + (y0 + ph / 2) + ")"}, "probability");
    var slot = pw / bars.length, bw = Math.min(30, slot * 0.7);
    bars.forEach(function (b, j) {
      var cx = x0 + slot * (j + 0.5), h = Math.min(1, b.p / ymax) * ph;
      var g = el("g", {"class": "dbar " + b.kind + (b.drawn ? " drawn" : ""), "data-bar-rank": b.rank === null ? "tail" : b.rank});
      if (b.drawn) { g.setAttribute("data-drawn", ""); }
      var r = el("rect", {x: cx - bw / 2, y: y0 + ph - h, width: bw, height: Math.max(h, b.p > 0 ? 1 : 0), "data-p": b.p}, undefined, g);
      el("title", {}, (b.rank === null ? "" : "rank " + b.rank + ": ") + b.label + ", p = " + fmt(b.p, 4), r);
      var label = b.label.length > 14 ? b.label.slice(0, 13) + "\u2026" : b.label;
      el("text", {x: cx, y: y0 + ph + 12, "text-anchor": "end", "class": "ticklabel" + (b.drawn ? " drawnlabel" : ""),
                  transform: "rotate(-40 " + cx + " " + (y0 + ph + 12) + ")", "data-token-label": ""}, label, g);
      if (b.drawn) { el("text", {x: cx, y: y0 + ph - h - 4, "text-anchor": "middle", "class": "ticklabel drawnlabel"}, "drawn", g); }
    });
  }

  function controls() {
    var form = document.querySelector("[data-controls]");
    var table = document.querySelector("[data-dist]");
    if (!form || !table || !data.decoding) { return; }
    form.addEventListener("submit", function (ev) { ev.preventDefault(); });
    var note = document.querySelector("[data-kept]"), sentence = document.querySelector("[data-decision]");
    var vocab = data.decoding.vocab_size, valid = {top_k: 0, top_p: 1}, drawn = null;
    function check(name) {
      var input = form[name], raw = input.value.trim(), v = Number(raw), msg = "";
      if (name === "top_k" && (raw === "" || !Number.isInteger(v) || v < 0 || v > vocab)) {
        msg = "top-k must be a whole number from 0 (off) to " + vocab + "; kept " + valid.top_k + ".";
      }
      if (name === "top_p" && (raw === "" || !(v > 0 && v <= 1))) {
        msg = "top-p must be above 0 and at most 1; kept " + valid.top_p + ".";
      }
      input.setCustomValidity(msg);
      var box = document.querySelector("[data-invalid=" + name + "]");
      box.textContent = msg; box.hidden = !msg;
      if (!msg) { valid[name] = v; }
    }
    function redraw() {
      check("top_k"); check("top_p");
      var T = parseFloat(form.temperature.value) || 1, k = valid.top_k, p = valid.top_p;
      form.t.value = fixed(T, 2);
      var res = decode(T, k, p), rows = table.querySelectorAll("tr[data-rank]"), i, shown = 0, inRows = 0;
      var peak = Math.max.apply(null, res.probs.concat([1e-12]));
      function bar(cell, q, colour, scale) {
        cell.textContent = "";
        var b = document.createElement("span");
        b.style.display = "inline-block"; b.style.height = "9px";
        b.style.width = Math.max(q > 0 ? 1 : 0, Math.round(240 * Math.min(1, q / (scale || peak)))) + "px"; b.style.background = colour;
        cell.appendChild(b);
      }
      for (i = 0; i < rows.length; i++) {
        var cells = rows[i].children, q = res.probs[i], inside = q > 0;
        cells[3].textContent = fmt(q, 4); cells[3].setAttribute("data-value", q);
        bar(cells[4], q, inside ? "#2a62c9" : "#ccc");
        shown += q; if (inside) { inRows++; }
        rows[i].className = (inside ? "kept" : "cut") + (drawn !== null && drawn.rank === i ? " drawn" : "");
      }
      var barMax = document.querySelector("[data-bar-max]"); if (barMax) { barMax.textContent = fmt(peak, 3); }
      var tailRow = table.querySelector("[data-tail]");
      if (tailRow) {
        var rest = Math.max(0, 1 - shown);
        tailRow.querySelector("[data-cell=tail]").textContent = fmt(rest, 4);
        bar(tailRow.children[4], rest, "#e0a000", 1);
        tailRow.children[4].appendChild(document.createTextNode(" of 1 (its own scale: the whole mass)"));
        tailRow.children[1].textContent = "every other token (" + Math.max(0, res.kept - inRows) + " of them kept)";
      }
      var top = data.decoding.top;
      var drawnRow = table.querySelector("[data-drawn-row]");
      if (drawnRow) {
        drawnRow.hidden = !(drawn !== null && drawn.rank >= rows.length);
        drawnRow.className = drawnRow.hidden ? "" : "drawn";
        if (!drawnRow.hidden) {
          var known = drawn.rank < top.length;
          drawnRow.querySelector("[data-cell=rank]").textContent = drawn.rank + 1;
          drawnRow.querySelector("[data-cell=token]").textContent = drawn.token !== undefined && drawn.token !== null ? showtok(drawn.token) : "(not named: only the top logits were stored here)";
          drawnRow.querySelector("[data-cell=logit]").textContent = known ? fmt(top[drawn.rank].logit, 3) : "";
          drawnRow.querySelector("[data-cell=p]").textContent = fmt(drawn.p, 4);
        }
      }
      note.textContent = res.kept + " token(s) stay in the running (" + fmt(100 * res.massKept, 2) +
        "% of the mass at this temperature), " + res.listedKept + " of them listed above" +
        (res.estimate ? "; the unlisted tokens' share at T \u2260 1 is an estimate (only the top logits were stored here)" : "") + ".";
      var s = "At temperature " + fixed(T, 2) + (k > 0 ? ", top-k " + k : "") + (p < 1 ? ", top-p " + p : "") +
        ", greedy decoding takes \u201c" + showtok(top[0].token) + "\u201d, now with p = " + fmt(res.probs[0], 4) +
        " (" + fmt(res.model[0], 4) + " before the cut)";
      if (drawn !== null) {
        var name = drawn.token !== undefined && drawn.token !== null ? "\u201c" + showtok(drawn.token) + "\u201d (id " + drawn.id + ")" :
          "an unlisted token (only the top logits were stored here, so it has no name)";
        s += "; the draw with seed " + drawn.seed + " (u = " + fixed(drawn.u, 4) + ") picked " + name + ", rank " + (drawn.rank + 1) +
          ", p = " + fmt(drawn.p, 4) + (drawn.binCount ? " (one of " + drawn.binCount + " tokens whose logits lie within " +
          data.decoding.tail.bin + " of each other; the page treats them as equally likely)" : "");
      } else {
        s += "; sampling would draw from the " + res.kept + " kept token(s)";
      }
      sentence.textContent = s + ".";
      distChart(res, drawn);
    }
    form.addEventListener("input", function () { drawn = null; redraw(); });
    document.querySelector("[data-sample]").addEventListener("click", function () {
      check("top_k"); check("top_p");
      var seed = parseInt(form.seed.value, 10) || 0, T = parseFloat(form.temperature.value) || 1;
      var d = draw(decode(T, valid.top_k, valid.top_p), seed);
      drawn = named(d); drawn.seed = seed;
      form.seed.value = seed + 1;
      redraw();
    });
    redraw();
  }

  // ---------------------------------------------------------------- layer and head ---------------------------
  var state = {layer: data.head ? data.head.layer : 0, head: data.head ? data.head.head : 0};
  function bindAll() {
    if (!data.layers) { return; }
    var row = data.layers.filter(function (r) { return r.layer === state.layer; })[0] || {};
    var head = data.heads.heads[state.layer + "." + state.head] || {};
    var root = Object.assign({}, row, {head: head});
    document.querySelectorAll("[data-bind]").forEach(function (el) {
      var v = lookup(root, el.getAttribute("data-bind")), digits = parseInt(el.getAttribute("data-digits") || "3", 10);
      if (el.getAttribute("data-kind") === "text") { el.textContent = v === null || v === undefined ? "" : String(v); return; }
      if (el.getAttribute("data-kind") === "comps") {
        el.textContent = (v || []).map(function (c) { return "[" + c[0] + "] " + fmt(c[1], 3); }).join(", ");
        return;
      }
      el.textContent = fmt(v, digits);
      if (el.hasAttribute("data-value")) { el.setAttribute("data-value", v === null || v === undefined ? "" : v); }
    });
    var out = document.querySelector("[data-layer-out]"); if (out) { out.textContent = state.layer; }
    var pick = document.querySelector("[data-layer-pick]"); if (pick) { pick.value = state.layer; }
    var neurons = document.querySelector("[data-neurons]");
    if (neurons) {
      neurons.querySelectorAll("tr:not(:first-child)").forEach(function (tr) { tr.remove(); });
      (row.neurons || []).forEach(function (m) {
        var tr = document.createElement("tr");
        if (m.weak) { tr.className = "weak"; }
        tr.setAttribute("data-strength", m.strength);
        [["#" + m.neuron], [fmt(m.value, 3)], [fmt(m.strength, 2)], m.up, m.down].forEach(function (cell, j) {
          var td = document.createElement("td"), zs = j === 3 ? m.z_up : m.z_down;
          if (j < 3) { td.textContent = cell[0]; } else {
            cell.forEach(function (t, i) {
              td.appendChild(tokNode(t)); td.appendChild(document.createTextNode(" "));
              var z = document.createElement("small"); z.textContent = fmt(zs[i], 1); td.appendChild(z);
              td.appendChild(document.createTextNode(" "));
            });
          }
          if (j === 2 && m.weak) {
            var flag = document.createElement("small"); flag.className = "weakflag"; flag.textContent = "little signal";
            td.appendChild(document.createTextNode(" ")); td.appendChild(flag);
          }
          tr.appendChild(td);
        });
        neurons.appendChild(tr);
      });
    }
    document.querySelectorAll("[data-grid-layer]").forEach(function (tr) {
      tr.classList.toggle("sel", Number(tr.getAttribute("data-grid-layer")) === state.layer);
    });
    document.querySelectorAll("[data-head]").forEach(function (td) {
      td.classList.toggle("on", td.getAttribute("data-head") === state.layer + "." + state.head);
    });
    var keys = document.querySelector("[data-keys]");
    if (keys) {
      ["raw", "score", "w", "kn", "vn", "cn", "ca"].forEach(function (name) {
        var tr = keys.querySelector("tr[data-row=" + name + "]"); if (!tr) { return; }
        var cells = tr.querySelectorAll("td"), values = head[name] || [];
        values.forEach(function (v, i) {
          var td = cells[i]; if (!td) { return; }
          var text = v === null ? "not captured" : fmt(v, name === "raw" || name === "kn" || name === "vn" ? 2 : 3);
          var span = td.querySelector(".num");
          if (span) { span.textContent = text; span.setAttribute("data-value", v === null ? "" : v); } else { td.textContent = text; }
          if (name === "w") { td.setAttribute("style", heat(v)); }
        });
        var rest = tr.querySelector("[data-rest]"); if (rest) { rest.textContent = fmt(head.rest_weight, 3); }
      });
    }
    matrix(head);
  }

  function matrix(head) {
    var svg = document.querySelector("[data-matrix]"); if (!svg || !head.matrix) { return; }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var pos = data.heads.matrix_pos, toks = data.heads.matrix_tokens, n = pos.length, pad = 92, size = 400, right = 50;
    var cell = (size - pad) / n;
    // `right`: room for the last column's slanted label, which leans past the grid's edge
    svg.setAttribute("viewBox", "0 0 " + (size + right) + " " + (size + 10));
    svg.setAttribute("width", Math.round(svg.getAttribute("height") * (size + right) / (size + 10)));
    function el(name, attrs, text) {
      var e = document.createElementNS(SVG, name);
      Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
      if (text !== undefined) { e.textContent = text; }
      svg.appendChild(e); return e;
    }
    pos.forEach(function (p, i) {
      el("text", {x: pad - 4, y: pad + i * cell + cell * 0.7, "text-anchor": "end", "class": "ticklabel"},
         p + " " + showtok(toks[i]).slice(0, 9));
      el("text", {x: pad + i * cell + cell / 2, y: pad - 4, "text-anchor": "start", "class": "ticklabel",
                  transform: "rotate(-60 " + (pad + i * cell + cell / 2) + " " + (pad - 4) + ")"}, p + " " + showtok(toks[i]).slice(0, 9));
    });
    var drawnRows = 0;
    head.matrix.forEach(function (row) {
      var qi = pos.indexOf(row[0]); if (qi < 0) { return; }
      drawnRows++;
      for (var j = 1; j < row.length; j++) {
        var w = row[j] / 1000, r = el("rect", {x: pad + (j - 1) * cell, y: pad + qi * cell, width: cell - 0.5, height: cell - 0.5,
                                               fill: "hsl(215,70%," + Math.round(97 - 55 * Math.max(0, Math.min(1, w))) + "%)"});
        var t = document.createElementNS(SVG, "title");
        t.textContent = "query " + row[0] + " \u2192 key " + pos[j - 1] + ": weight " + fixed(w, 3); r.appendChild(t);
      }
    });
    var noteEl = document.querySelector("[data-matrix-note]");
    if (noteEl) {
      noteEl.textContent = drawnRows < n ? " " + (n - drawnRows) + " of these " + n + " query positions were not captured (rows left empty): capture them with --attn-positions all." : "";
    }
  }

  function layerControls() {
    var pick = document.querySelector("[data-layer-pick]");
    if (pick) {
      pick.addEventListener("input", function () { state.layer = Number(pick.value); bindAll(); });
    }
    document.querySelectorAll("[data-head]").forEach(function (td) {
      function choose() {
        var parts = td.getAttribute("data-head").split(".");
        state.layer = Number(parts[0]); state.head = Number(parts[1]); bindAll();
      }
      td.addEventListener("click", choose);
      td.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); choose(); } });
    });
    document.querySelectorAll("[data-box]").forEach(function (g) {
      function open() {
        var key = g.getAttribute("data-box");
        document.querySelectorAll("[data-box]").forEach(function (o) { o.classList.toggle("sel", o === g); });
        document.querySelectorAll("[data-box-info]").forEach(function (i) { i.hidden = i.getAttribute("data-box-info") !== key; });
      }
      g.addEventListener("click", open);
      g.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
    });
    bindAll();
  }

  // A map's path points answer the pointer by distance, not by which marker is drawn on top: every point within
  // reach is named, so a layer hidden under another's marker can still be read.
  function mapHover() {
    var info = document.querySelector("[data-map-info]");
    if (!info || !data.lens) { return; }
    function reading(ell) {
      var row = data.lens.filter(function (r) { return r.layer === ell; })[0];
      return "boundary " + ell + (row ? ": the lens reads \u201c" + showtok(row.token) + "\u201d with p = " + fmt(row.prob, 3) : "");
    }
    document.querySelectorAll("[data-map]").forEach(function (svg) {
      var steps = Array.prototype.slice.call(svg.querySelectorAll("circle.step"));
      svg.addEventListener("mousemove", function (ev) {
        var near = [];
        steps.forEach(function (c) {
          var b = c.getBoundingClientRect(), dx = ev.clientX - (b.left + b.width / 2), dy = ev.clientY - (b.top + b.height / 2);
          var dist = Math.sqrt(dx * dx + dy * dy);
          if (dist <= Math.max(6, b.width / 2 + 1)) { near.push({d: dist, layer: Number(c.getAttribute("data-layer"))}); }
        });
        if (!near.length) { return; }
        near.sort(function (a, b) { return a.d - b.d || a.layer - b.layer; });
        info.textContent = near.map(function (n) { return reading(n.layer); }).join(" \u00b7 ");
      });
    });
  }

  // ---------------------------------------------------------------- colour strips ----------------------------
  var STRIP_NEG = [33, 102, 172], STRIP_POS = [178, 24, 43];  // render.strip_colour's ends: the same rule
  function stripColour(x) {
    var t = Math.min(1, Math.abs(x)), end = x < 0 ? STRIP_NEG : STRIP_POS;
    return "rgb(" + end.map(function (c) { return Math.round(255 + (c - 255) * t); }).join(",") + ")";
  }
  function paintStrips() {
    document.querySelectorAll("canvas[data-strip]").forEach(function (canvas) {
      var s = (data.strips || {})[canvas.getAttribute("data-strip")];
      var ctx = canvas.getContext && canvas.getContext("2d");
      if (!s || !ctx) { return; }
      var top = s.top || 1, cell = s.cell;
      s.values.forEach(function (v, i) { ctx.fillStyle = stripColour(v / top); ctx.fillRect(i * cell, 0, cell, canvas.height); });
      var out = document.querySelector("[data-strip-hover=" + s.name + "]");
      canvas.addEventListener("mousemove", function (ev) {
        var b = canvas.getBoundingClientRect(), i = Math.floor((ev.clientX - b.left) / b.width * s.d);
        if (i >= 0 && i < s.d && out) { out.textContent = "dimension " + i + ": " + fmt(s.values[i], 4); }
      });
    });
  }

  function switches() {
    document.querySelectorAll("[data-heat]").forEach(function (radio) {
      radio.addEventListener("change", function () {
        document.querySelectorAll("[data-heat-table]").forEach(function (t) {
          t.hidden = t.getAttribute("data-heat-table") !== radio.value;
        });
      });
    });
    var select = document.querySelector("[data-neighbour-layer]");
    if (select) {
      select.addEventListener("change", function () {
        document.querySelectorAll("table.nb").forEach(function (t) { t.hidden = t.getAttribute("data-layer") !== select.value; });
      });
    }
    var filter = document.querySelector("[data-filter]");
    if (filter) {
      filter.addEventListener("input", function () {
        var q = filter.value.toLowerCase();
        document.querySelectorAll("[data-entry]").forEach(function (li) {
          li.hidden = q !== "" && li.textContent.toLowerCase().indexOf(q) < 0;
        });
      });
    }
    var pickA = document.querySelector("[data-compare-head]");
    if (pickA) {
      pickA.addEventListener("change", function () {
        document.querySelectorAll("[data-compare-pane]").forEach(function (t) { t.hidden = t.getAttribute("data-compare-pane") !== pickA.value; });
      });
    }
  }

  // ---------------------------------------------------------------- your own text (served index) ------------
  function ask() {
    var form = document.querySelector("[data-ask]");
    if (!form) { return; }
    var status = document.querySelector("[data-ask-status]");
    function say(text) { status.textContent = text; }
    function detail(body) { return body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : ""; }
    function poll(runId) {
      fetch("/runs/" + runId, {headers: {accept: "application/json"}}).then(function (r) { return r.json(); }).then(function (run) {
        var job = run.job || {status: run.status, progress: {}};
        var p = job.progress || {};
        if (job.status === "failed") { say("The server could not store it: " + (job.error || "failed") + "."); form.hidden = false; return; }
        if (job.status === "done" && p.prompts && p.prompts.length) {
          say("Stored as prompt " + p.prompts[0][0] + "; opening its journey (the page may first fit its run's map)…");
          window.location.href = "journey-" + p.prompts[0][0] + ".html";
          return;
        }
        var waited = job.status === "queued" ? "queued behind other jobs, " + fmt(job.queued_s, 0) + " s" :
          "running, " + fmt(job.running_s, 1) + " s" + (p.tokens ? ", " + p.tokens + " tokens" : "");
        say("Run " + runId + ": " + waited + "…");
        window.setTimeout(function () { poll(runId); }, 500);
      }).catch(function (e) { say("Lost the server: " + e); form.hidden = false; });
    }
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var text = form.querySelector("[data-ask-text]").value;
      if (!text.trim()) { say("Type a text first."); return; }
      form.hidden = true;
      say("Sending…");
      fetch("/runs", {method: "POST", headers: {"content-type": "application/json"},
                      body: JSON.stringify({prompts: [text], name: "typed", capture: {attn_positions: "all", lens_positions: "all"}})})
        .then(function (r) { return r.json().then(function (body) { return {ok: r.ok, status: r.status, body: body}; }); })
        .then(function (res) {
          if (!res.ok) { say("Refused (" + res.status + "): " + detail(res.body)); form.hidden = false; return; }
          poll(res.body.run_id);
        }).catch(function (e) { say("Could not reach the server: " + e); form.hidden = false; });
    });
  }

  controls();
  paintStrips();
  layerControls();
  mapHover();
  switches();
  ask();
})();
