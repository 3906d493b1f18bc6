// rayloop console: draws the charts (uPlot, vendored) and keeps the model page's live view current.
// window.rayloopCharts[id] = {labels, data} mirrors what each chart shows (the browser test reads it).
(function () {
  "use strict";
  const charts = (window.rayloopCharts = {});
  const COLORS = { stable: "#1f77b4", canary: "#d62728", shadow: "#7f7f7f" };
  const METRICS = ["p95_ms", "error_rate", "mean_rating"];
  const POLL_MS = 2000;

  function colour(label) {
    for (const slot of Object.keys(COLORS)) if (label.endsWith(slot)) return COLORS[slot];
    return "#2ca02c";
  }

  function width(el) {
    return Math.max(280, Math.min(560, (el.parentElement || el).clientWidth || 480));
  }

  // Draw (or redraw) chart `id` with one series per label; data = [xs, ...ys] in uPlot's layout.
  function draw(id, labels, data, opts) {
    const el = document.getElementById(id);
    if (!el) return;
    const entry = charts[id];
    const same = entry && entry.labels.join("|") === labels.join("|");
    if (same) {
      entry.plot.setData(data);
    } else {
      if (entry) entry.plot.destroy();
      const series = [{}].concat(
        labels.map((l) => ({
          label: l,
          stroke: colour(l),
          width: 2,
          spanGaps: true,
          paths: opts && opts.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
        }))
      );
      const scales = opts && opts.range ? { y: { range: opts.range } } : {};
      const plot = new uPlot({ width: width(el), height: 200, series: series, scales: scales }, data, el);
      charts[id] = { plot: plot, labels: labels, data: data };
    }
    charts[id].data = data;
  }

  // --- a rollout's page: traffic on the new version over time ---------------------------------------
  const traffic = document.getElementById("traffic-data");
  if (traffic) {
    const d = JSON.parse(traffic.textContent);
    const now = Date.now() / 1000;
    const pts = d.points.concat(d.points.length ? [[Math.max(now, d.points[d.points.length - 1][0]), d.points[d.points.length - 1][1]]] : []);
    draw("chart-traffic", [d.label], [pts.map((p) => p[0]), pts.map((p) => p[1])], { stepped: true, range: [0, 100] });
  }

  // --- a model's page: live weights and per-slot windows -------------------------------------------
  const live = document.getElementById("live");
  if (!live) return;
  const initial = JSON.parse(document.getElementById("live-initial").textContent);
  // One row per poll: {t, weight: {label: v}, p95_ms: {...}, error_rate: {...}, mean_rating: {...}}
  const rows = [];

  function versionOf(view) {
    const out = {};
    for (const w of view.weights) out[w.slot] = w.version;
    return out;
  }

  function label(slot, versions) {
    return versions[slot] !== undefined ? "v" + versions[slot] + " " + slot : slot;
  }

  function addRow(view) {
    const versions = versionOf(view);
    const row = { t: view.time, weight: {} };
    for (const w of view.weights) row.weight[label(w.slot, versions)] = w.percent;
    for (const m of METRICS) {
      row[m] = {};
      for (const [slot, win] of Object.entries(view.slots || {})) {
        if (win[m] !== null && win[m] !== undefined) row[m][label(slot, versions)] = win[m];
      }
    }
    rows.push(row);
    if (rows.length > 900) rows.shift();
  }

  function redraw() {
    for (const key of ["weight"].concat(METRICS)) {
      const labels = [...new Set(rows.flatMap((r) => Object.keys(r[key] || {})))].sort();
      const data = [rows.map((r) => r.t)].concat(labels.map((l) => rows.map((r) => (r[key] && l in r[key] ? r[key][l] : null))));
      draw("chart-" + key, labels, data, key === "weight" ? { stepped: true, range: [0, 100] } : null);
    }
  }

  function updateTables(view) {
    const tbody = document.querySelector("#weights tbody");
    if (tbody) {
      tbody.replaceChildren(
        ...view.weights.map((w) => {
          const tr = document.createElement("tr");
          tr.dataset.slot = w.slot;
          tr.dataset.version = String(w.version);
          tr.dataset.weight = String(w.percent);
          const th = document.createElement("th");
          th.scope = "row";
          th.textContent = w.slot;
          const v = document.createElement("td");
          v.textContent = "v" + w.version;
          const p = document.createElement("td");
          p.className = "weight";
          p.textContent = Number(w.percent.toPrecision(4)) + "%" + (w.mirrored ? " mirrored" : "");
          tr.append(th, v, p);
          return tr;
        })
      );
    }
    live.dataset.updated = String(view.time);
  }

  // The steps judged so far (from the rollout's history), then the live window now.
  const steps = initial.steps;
  if (steps) {
    const versions = versionOf(initial.live);
    const times = [...new Set(METRICS.flatMap((m) => Object.values(steps[m] || {}).flatMap((pts) => pts.map((p) => p[0]))))].sort();
    for (const t of times) {
      const row = { t: t, weight: {} };
      for (const m of METRICS) {
        row[m] = {};
        for (const [slot, pts] of Object.entries(steps[m] || {})) {
          const hit = pts.find((p) => p[0] === t);
          if (hit && hit[1] !== null) row[m][label(slot, versions)] = hit[1];
        }
      }
      rows.push(row);
    }
  }
  addRow(initial.live);
  redraw();

  async function poll() {
    try {
      const r = await fetch(live.dataset.live, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.ok) {
        const view = await r.json();
        addRow(view);
        redraw();
        updateTables(view);
      }
    } catch (e) {
      // the next poll tries again
    }
    setTimeout(poll, POLL_MS);
  }
  setTimeout(poll, POLL_MS);
})();
