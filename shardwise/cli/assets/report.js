/* shardwise report: draws the timeline, memory and communication charts from the embedded plan data.
   No network, no libraries. When done it marks the page: <html data-rendered="timeline memory comm">,
   #render-status, and " [rendered]" at the end of the title; script errors are listed in #render-errors. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = { compute: "#3b7dd8", backward: "#1f4f96", comm: "#e8833a", gradients: "#c0392b", bubble: "#d9d9d9" };

  function el(tag, attrs, parent, text) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs) { if (Object.prototype.hasOwnProperty.call(attrs, k)) node.setAttribute(k, attrs[k]); }
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function fmtTime(s) {
    if (s >= 1) return s.toFixed(3) + " s";
    if (s >= 1e-3) return (s * 1e3).toFixed(3) + " ms";
    return (s * 1e6).toFixed(1) + " us";
  }
  function fmtBytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(2) + " " + units[i];
  }
  function ticks(max, count) {
    if (!(max > 0)) return [0];
    var raw = max / count, mag = Math.pow(10, Math.floor(Math.log10(raw))), step = mag;
    [1, 2, 2.5, 5, 10].some(function (m) { step = m * mag; return step >= raw; });
    var out = [];
    for (var t = 0; t <= max * 1.0001; t += step) out.push(t);
    return out;
  }
  function width(host) { return Math.max(640, Math.min(host.clientWidth || 1000, 2400)); }
  function tip(node, text) { el("title", {}, node, text); }

  function drawTimeline(host, tl) {
    var ranks = tl.ranks, W = width(host), left = 64, right = 16, top = 26, rowH = 22, gap = 6;
    var H = top + ranks.length * (rowH + gap) + 8;
    var svg = el("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, id: "timeline-svg" }, null);
    var span = tl.makespan_s > 0 ? tl.makespan_s : 1, sx = (W - left - right) / span;
    var axis = el("g", { "class": "axis" }, svg);
    ticks(span, 8).forEach(function (t) {
      var x = left + t * sx;
      el("line", { x1: x, x2: x, y1: top - 4, y2: H - 6 }, axis);
      el("text", { x: x, y: top - 8, "text-anchor": "middle" }, axis, fmtTime(t));
    });
    var rowOf = {};
    ranks.forEach(function (r, i) {
      rowOf[r] = i;
      el("text", { x: left - 8, y: top + i * (rowH + gap) + rowH / 2 + 4, "text-anchor": "end" }, svg, "rank " + r);
    });
    var bars = el("g", { "class": "segments" }, svg), drawn = 0;
    tl.segments.forEach(function (s) {
      var rank = s[0], start = s[1], dur = s[2], kind = tl.kinds[s[3]], label = tl.labels[s[4]], mb = s[5],
          phase = tl.phases[s[6]];
      var color = kind === "bubble" ? COLORS.bubble : kind === "comm" ? (phase === "gradients" ? COLORS.gradients : COLORS.comm)
                  : (phase === "backward" ? COLORS.backward : COLORS.compute);
      var x = left + start * sx, w = Math.max(dur * sx, 0.6), y = top + rowOf[rank] * (rowH + gap);
      var rect = el("rect", { x: x, y: y, width: w, height: rowH, fill: color, "class": "seg seg-" + kind,
                              stroke: kind === "bubble" ? "none" : "#ffffff", "stroke-width": 0.3 }, bars);
      tip(rect, "rank " + rank + " | " + kind + (phase !== "idle" ? " (" + phase + ")" : "") +
          (mb >= 0 ? " | micro-batch " + mb : "") + "\n" + label + "\n" + fmtTime(start) + " + " + fmtTime(dur));
      if (w > 26 && mb >= 0 && kind === "compute" && tl.micro_batches > 1) {
        el("text", { x: x + w / 2, y: y + rowH / 2 + 4, "text-anchor": "middle", fill: "#fff", style: "fill:#fff" },
           bars, (phase === "backward" ? "B" : "F") + mb);
      }
      drawn++;
    });
    host.appendChild(svg);
    host.setAttribute("data-segments", String(drawn));
    return drawn;
  }

  function drawMemory(host, rows) {
    var W = width(host), left = 64, right = 230, top = 8, rowH = 18, gap = 6;
    var H = top + rows.length * (rowH + gap) + 8;
    var svg = el("svg", { width: W, height: H, id: "memory-svg" }, null);
    var parts = [["params", "#3b7dd8"], ["grads", "#8e44ad"], ["optimizer", "#16a085"], ["activations", "#e8833a"]];
    rows.forEach(function (r, i) {
      var y = top + i * (rowH + gap), cap = r.capacity > 0 ? r.capacity : Math.max(r.total, 1);
      var scale = (W - left - right) / Math.max(cap, r.total);
      el("text", { x: left - 8, y: y + rowH / 2 + 4, "text-anchor": "end" }, svg, "rank " + r.rank);
      tip(el("rect", { x: left, y: y, width: cap * scale, height: rowH, fill: "#f3f4f6", stroke: "#9ca3af" }, svg),
          "capacity " + fmtBytes(cap));
      var x = left;
      parts.forEach(function (p) {
        var v = r[p[0]] || 0;
        if (v <= 0) return;
        var w = Math.max(v * scale, 1.5);
        tip(el("rect", { x: x, y: y + 2, width: w, height: rowH - 4, fill: p[1], "class": "mem-" + p[0] }, svg),
            p[0] + ": " + fmtBytes(v));
        x += w;
      });
      var pct = r.capacity > 0 ? " (" + (100 * r.total / r.capacity).toFixed(r.total / r.capacity < 0.01 ? 3 : 1) + "%)" : "";
      el("text", { x: W - right + 8, y: y + rowH / 2 + 4 }, svg,
         fmtBytes(r.total) + " of " + fmtBytes(r.capacity) + pct);
    });
    host.appendChild(svg);
    return rows.length;
  }

  function drawComm(host, rows) {
    var W = width(host), left = 210, right = 190, top = 8, rowH = 18, gap = 6;
    if (!rows.length) {
      var p = document.createElement("p");
      p.textContent = "No collectives: no rank waits for another.";
      host.appendChild(p);
      return 0;
    }
    var H = top + rows.length * (rowH + gap) + 8;
    var svg = el("svg", { width: W, height: H, id: "comm-svg" }, null);
    var max = Math.max.apply(null, rows.map(function (r) { return r.time_s; })) || 1;
    rows.forEach(function (r, i) {
      var y = top + i * (rowH + gap), w = Math.max((W - left - right) * r.time_s / max, 1.5);
      el("text", { x: left - 8, y: y + rowH / 2 + 4, "text-anchor": "end" }, svg,
         r.collective + " on " + r.axis + " (" + r.algorithm + ")");
      tip(el("rect", { x: left, y: y, width: w, height: rowH, fill: COLORS.comm }, svg),
          r.count + " x, " + fmtBytes(r.nbytes) + ", " + fmtTime(r.time_s));
      el("text", { x: left + w + 6, y: y + rowH / 2 + 4 }, svg,
         fmtTime(r.time_s) + "  " + r.count + " x  " + fmtBytes(r.nbytes));
    });
    host.appendChild(svg);
    return rows.length;
  }

  var data = JSON.parse(document.getElementById("report-data").textContent);
  var done = [];
  var steps = [["timeline", function () { return drawTimeline(document.getElementById("timeline"), data.timeline); }],
               ["memory", function () { return drawMemory(document.getElementById("memory"), data.memory); }],
               ["comm", function () { return drawComm(document.getElementById("comm"), data.comm); }]];
  steps.forEach(function (s) {
    try { s[1](); done.push(s[0]); } catch (e) { window.__reportError(s[0] + ": " + (e && e.stack ? e.stack : e)); }
  });
  document.documentElement.setAttribute("data-rendered", done.join(" "));
  document.documentElement.setAttribute("data-errors", String(window.__reportErrors.length));
  document.getElementById("render-status").textContent =
    "rendered: " + done.join(", ") + "; script errors: " + window.__reportErrors.length;
  document.title = document.title + " [rendered]";
})();
