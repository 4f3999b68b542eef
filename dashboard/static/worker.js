// The worker dashboard: renders each snapshot pushed on the "ws" socket (shapes in docs/worker-api.md).
// Uses LineChart, liveSocket, control and the format helpers of charts.js.
"use strict";

const $ = id => document.getElementById(id);
const initial = JSON.parse($("initial").textContent);
const CHART_SECONDS = 300;
const GPU_COLORS = ["#c98a00", "#8e44ad", "#16a085", "#d03b3b", "#2f6fde", "#1f9d55"];
const cpuChart = new LineChart($("chart-cpu"), [{name: "CPU", color: "#2f6fde"}], {unit: "%", max: 100});
const memoryChart = new LineChart($("chart-memory"), [{name: "memory", color: "#1f9d55"}], {unit: "%", max: 100});
let gpuChart = null;
let samples = initial.samples;
let latest = initial.live;
let pendingRestart = null;  // what the worker looked like when a restart was asked for

const percent = v => v == null ? "–" : `${Math.round(v)}%`;
const clock = t => new Date(t * 1000).toLocaleTimeString();
const pill = (state, text) => `<span class="pill pill-${escapeHtml(state)}">${escapeHtml(text ?? state)}</span>`;
const tasks = b => b.count === 1 ? `#${b.start}` : `#${b.start}–${b.start + b.count - 1} (${b.count})`;

function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = !text;
}

function renderStatus(st) {
  $("status").textContent = st.status;
  $("status").className = `pill pill-${st.status}`;
  $("pause-reason").textContent = st.pause_reason ? `paused: ${st.pause_reason}` : "";
  $("connection").textContent = st.connected ? `connected since ${clock(st.connected_since)}`
      + (st.env_mismatch ? ` — ${st.env_mismatch}` : "")
    : st.last_error ? `not connected: ${st.last_error}` : "connecting…";
  $("connection").className = st.connected && !st.env_mismatch ? "" : "error";
  $("running").textContent = st.current_tasks.length;
  $("queued").textContent = st.queued_batches ? `· ${st.queued_batches} queued` : "";
  $("current").innerHTML = st.current_tasks.length ? st.current_tasks.map(t => `<tr>
      <td>${t.job}</td><td>${tasks(t)}</td>
      <td class="num">${clock(t.started)}</td><td class="num">${formatDuration(t.running_for)}</td></tr>`).join("")
    : `<tr><td colspan="4" class="muted">Nothing running.</td></tr>`;
}

function renderStats(stats, system) {
  $("tasks_completed").textContent = formatNumber(stats.tasks_completed);
  $("tasks_failed").textContent = formatNumber(stats.tasks_failed);
  $("tasks_per_minute").textContent = formatNumber(stats.tasks_per_minute);
  $("avg_task_time").textContent = stats.tasks_completed + stats.tasks_failed ? formatDuration(stats.avg_task_time) : "–";
  $("uptime").textContent = formatDuration(stats.uptime);
  $("reconnects").textContent = stats.reconnects;
  const cpu = system.cpu, memory = system.memory, load = system.load;
  $("cpu-now").textContent = percent(cpu.percent);
  $("cpu-detail").textContent = `${cpu.count} cores` + (load ? ` · load ${load.join(" ")}` : "");
  $("memory-now").textContent = percent(memory.percent);
  $("memory-detail").textContent = memory.used == null ? `${formatBytes(memory.total)} in all`
    : `${formatBytes(memory.used)} of ${formatBytes(memory.total)} in use`;
  const proc = system.process, net = system.network;
  $("process").textContent = proc.rss == null ? "–"
    : `worker ${formatBytes(proc.rss)} · tasks ${formatBytes(proc.tasks_rss)}`;
  $("network").textContent = !net ? "–" : net.send_rate == null ? `↑ ${formatBytes(net.bytes_sent)} ↓ ${formatBytes(net.bytes_recv)}`
    : `↑ ${formatBytes(net.send_rate)}/s ↓ ${formatBytes(net.recv_rate)}/s`;
}

function renderGpus(gpus) {
  const svg = $("chart-gpu");
  svg.hidden = !gpus.length;
  $("gpu-none").hidden = gpus.length > 0;
  if (!gpus.length) {
    $("gpu-now").textContent = "";
    $("gpu-detail").textContent = "NVML sees no NVIDIA GPU or driver on this machine.";
    return;
  }
  if (!gpuChart || gpuChart.series.length !== gpus.length) {
    gpuChart = new LineChart(svg, gpus.map((g, i) => ({name: g.name, color: GPU_COLORS[i % GPU_COLORS.length]})),
                             {unit: "%", max: 100});
  }
  $("gpu-now").textContent = gpus.map(g => percent(g.utilization)).join(" · ");
  $("gpu-detail").innerHTML = gpus.map((g, i) => `<div><i class="swatch" style="background:${GPU_COLORS[i % GPU_COLORS.length]}"></i>
      ${escapeHtml(g.name)}: ${formatBytes(g.memory_used)} of ${formatBytes(g.memory_total)}`
      + (g.temperature == null ? "" : ` · ${g.temperature} °C`)
      + (g.power == null ? "" : ` · ${Math.round(g.power)} W`) + "</div>").join("");
}

function renderCharts(gpuCount) {
  if (samples.length) {
    const newest = samples[samples.length - 1].time;
    samples = samples.filter(p => p.time >= newest - CHART_SECONDS);
  }
  cpuChart.update(samples.map(p => [p.time, p.cpu ?? 0]));
  memoryChart.update(samples.map(p => [p.time, p.memory ?? 0]));
  if (gpuChart && gpuCount) {
    gpuChart.update(samples.map(p => [p.time, ...Array.from({length: gpuCount}, (_, i) => p.gpus[i] ?? 0)]));
  }
}

function renderBatches(batches) {
  if (!batches.length) return;
  $("batches").innerHTML = batches.map(b => {
    const result = b.status !== "ok" ? pill(b.status) : b.failed ? pill("failed", `${b.failed} failed`) : pill("ok");
    return `<tr><td>${clock(b.finished)}</td><td>${b.job}</td><td>${tasks(b)}</td>
      <td class="num">${formatDuration(b.duration)}</td><td>${result}</td>
      <td class="error-text" title="${escapeHtml(b.error)}">${escapeHtml(b.error)}</td></tr>`;
  }).join("");
}

function render(live) {
  const st = live.status, stats = live.stats;
  renderStatus(st);
  renderStats(stats, live.system);
  renderGpus(live.gpus);
  const last = samples[samples.length - 1];
  if (live.sample && (!last || live.sample.time > last.time)) samples.push(live.sample);
  renderCharts(live.gpus.length);
  renderBatches(live.batches);
  if (pendingRestart && st.connected &&
      (stats.reconnects > pendingRestart.reconnects || st.started !== pendingRestart.started)) {
    notice(`Restarted: reconnected to the foreman at ${clock(st.connected_since)}.`);
    pendingRestart = null;
  }
  latest = live;
}

async function restart(hard) {
  const question = hard
    ? "Re-execute this worker's process? Running tasks stop and go back to the foreman; it returns with the same id."
    : "Restart this worker? Running tasks stop and go back to the foreman; it reconnects at once.";
  if (!confirm(question)) return;
  const before = latest;
  const response = await control(hard ? "restart?hard=true" : "restart");
  if (!response.ok) {
    notice(`Restart failed: ${response.status} ${(await response.json()).detail ?? ""}`);
    return;
  }
  pendingRestart = {reconnects: before.stats.reconnects, started: before.status.started};
  notice(hard ? "Re-executing the worker process…" : "Restarting: reconnecting to the foreman…");
}

$("restart").addEventListener("click", () => restart(false));
$("restart-hard").addEventListener("click", () => restart(true));
render(initial.live);
liveSocket("ws", render);
