// geomap reports: in-page decoding controls and view switches. No network, no libraries.
(function () {
  "use strict";
  var node = document.getElementById("geomap-data");
  var data = node ? JSON.parse(node.textContent || "{}") : {};

  function fmt(x, digits) { return (Math.round(x * Math.pow(10, digits)) / Math.pow(10, digits)).toFixed(digits); }

  // Decoding: softmax with temperature, then top-k, then top-p (transformers' order), over the embedded logits.
  // The tokens beyond the embedded ones have a known total mass at T = 1 (from the stored logsumexp); at other
  // temperatures they are treated as sharing one equal logit with that mass (an approximation, said on the page).
  function redraw(form, table, note) {
    var dec = data.decoding, top = dec.top, T = parseFloat(form.temperature.value) || 1;
    var k = parseInt(form.top_k.value, 10) || 0, p = parseFloat(form.top_p.value);
    if (!(p > 0 && p <= 1)) { p = 1; }
    form.t.value = fmt(T, 2);
    var unseen = dec.vocab_size - top.length, seen1 = 0, i;
    for (i = 0; i < top.length; i++) { seen1 += Math.exp(top[i].logit - dec.logsumexp); }
    var tail1 = Math.max(0, 1 - seen1);
    var zbar = (tail1 > 0 && unseen > 0) ? dec.logsumexp + Math.log(tail1 / unseen) : -Infinity;
    var scaled = top.map(function (c) { return c.logit / T; });
    var m = Math.max(scaled[0], zbar / T), s = 0;
    for (i = 0; i < scaled.length; i++) { s += Math.exp(scaled[i] - m); }
    var tail = k > 0 ? 0 : unseen * Math.exp(zbar / T - m);
    var probs = scaled.map(function (z) { return Math.exp(z - m) / (s + tail); });
    var tailMass = tail / (s + tail);
    // top-p keeps the most probable tokens until their mass reaches p (the unseen block comes last).
    var limit = k > 0 ? Math.min(k, probs.length) : probs.length, mass = 0, n = limit, keepTail = k === 0;
    for (i = 0; i < limit; i++) {
      mass += probs[i];
      if (p < 1 && mass >= p) { n = i + 1; keepTail = false; break; }
    }
    var total = 0; for (i = 0; i < n; i++) { total += probs[i]; }
    if (keepTail) { total += tailMass; }
    var rows = table.querySelectorAll("tr");
    for (i = 1; i < rows.length; i++) {
      var cells = rows[i].children, idx = i - 1, inside = idx < n, q = inside ? probs[idx] / total : 0;
      cells[3].textContent = fmt(q, 4);
      cells[4].textContent = "";
      var bar = document.createElement("span");
      bar.style.display = "inline-block"; bar.style.height = "9px";
      bar.style.width = Math.round(300 * q) + "px";
      bar.style.background = inside ? "#2a62c9" : "#ccc";
      cells[4].appendChild(bar);
      rows[i].className = inside ? "kept" : "cut";
    }
    note.textContent = "kept " + n + " listed token(s)" + (keepTail ? " and the " + unseen + " unlisted ones" : "") +
      " at temperature " + fmt(T, 2) + (k > 0 ? ", top-k " + k : "") + (p < 1 ? ", top-p " + p : "") +
      "; the top token's probability is " + fmt(probs[0] / total, 4) + "." +
      (T !== 1 && keepTail ? " (The unlisted tokens' share at this temperature is estimated.)" : "");
  }

  var form = document.querySelector("[data-controls]");
  var table = document.querySelector("[data-dist]");
  var note = document.querySelector("[data-kept]");
  if (form && table && data.decoding) {
    form.addEventListener("input", function () { redraw(form, table, note); });
    redraw(form, table, note);
  }

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
      document.querySelectorAll("table.nb").forEach(function (t) {
        t.hidden = t.getAttribute("data-layer") !== select.value;
      });
    });
  }
})();
