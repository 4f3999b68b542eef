// A tiny SVG line chart for live dashboards: no libraries, no network.
"use strict";

class LineChart {
  // svg: an <svg> element; series: [{name, color}]; opts: {unit, max}
  constructor(svg, series, opts = {}) {
    this.svg = svg;
    this.series = series;
    this.opts = opts;
    this.svg.setAttribute("preserveAspectRatio", "none");
  }

  // points: [[t, v0, v1, ...], ...] with t in seconds
  update(points) {
    const w = 600, h = 140, pad = 22;
    this.svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const ns = "http://www.w3.org/2000/svg";
    while (this.svg.firstChild) this.svg.removeChild(this.svg.firstChild);
    let max = this.opts.max || 0;
    for (const p of points) for (let i = 1; i < p.length; i++) max = Math.max(max, p[i]);
    max = max > 0 ? niceCeil(max) : 1;
    for (const frac of [0, 0.5, 1]) {
      const y = h - pad - frac * (h - 2 * pad);
      const line = document.createElementNS(ns, "line");
      line.setAttribute("x1", pad); line.setAttribute("x2", w); line.setAttribute("y1", y); line.setAttribute("y2", y);
      line.setAttribute("class", "grid-line");
      this.svg.appendChild(line);
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", 0); label.setAttribute("y", y - 2);
      label.textContent = formatNumber(max * frac) + (this.opts.unit || "");
      this.svg.appendChild(label);
    }
    if (points.length < 2) return;
    const t0 = points[0][0], t1 = points[points.length - 1][0], span = Math.max(t1 - t0, 1);
    this.series.forEach((s, i) => {
      const coords = points.map(p => {
        const x = pad + (p[0] - t0) / span * (w - pad);
        const y = h - pad - (p[i + 1] / max) * (h - 2 * pad);
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", coords.join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", s.color);
      line.setAttribute("stroke-width", "2");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      this.svg.appendChild(line);
    });
  }
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function formatNumber(v) {
  if (v >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function formatBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function formatDuration(s) {
  if (s == null) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// Live updates: a WebSocket next to the page (relative, so it works behind a path-prefix proxy).
function liveSocket(path, onMessage) {
  const pill = document.getElementById("live");
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  let delay = 500;
  const connect = () => {
    const ws = new WebSocket(url);
    ws.onopen = () => { delay = 500; pill.textContent = "live"; pill.className = "pill pill-ok"; };
    ws.onmessage = ev => onMessage(JSON.parse(ev.data));
    ws.onclose = () => {
      pill.textContent = "reconnecting…"; pill.className = "pill pill-wait";
      setTimeout(connect, delay); delay = Math.min(delay * 2, 10000);
    };
  };
  connect();
}

function escapeHtml(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

// POST to a control endpoint; on 401/403 ask for the token once and retry with it.
async function control(path) {
  const send = token => fetch(path, {method: "POST", headers: token ? {Authorization: `Bearer ${token}`} : {}});
  let token = sessionStorage.getItem("crowdcompute_token");
  let response = await send(token);
  if (response.status === 401 || response.status === 403) {
    token = prompt("This action needs the token:");
    if (!token) return response;
    sessionStorage.setItem("crowdcompute_token", token);
    response = await send(token);
  }
  return response;
}
