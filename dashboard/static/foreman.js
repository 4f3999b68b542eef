// The foreman dashboard: renders each snapshot pushed on the "ws" socket.
"use strict";

const rateChart = new LineChart(document.getElementById("chart-rate"), [{name: "tasks/s", color: "#2f6fde"}]);
const workerChart = new LineChart(document.getElementById("chart-workers"), [{name: "workers", color: "#1f9d55"}]);
const $ = id => document.getElementById(id);
const pill = state => `<span class="pill pill-${escapeHtml(state)}">${escapeHtml(state)}</span>`;

function progressBar(job) {
  const total = job.total || (job.done + job.failed + job.running + job.queued) || 1;
  const pct = n => (100 * n / total).toFixed(2);
  return `<div class="bar" role="progressbar" aria-valuenow="${pct(job.done + job.failed)}"
              aria-valuemin="0" aria-valuemax="100" title="${pct(job.done + job.failed)}%">
      <span class="done" style="width:${pct(job.done)}%"></span>
      <span class="failed" style="width:${pct(job.failed)}%"></span>
      <span class="running" style="width:${pct(job.running)}%"></span></div>`;
}

function renderJobs(jobs) {
  if (!jobs.length) return;
  $("jobs").innerHTML = jobs.map(j => `<tr data-job="${j.id}">
      <td>${j.id}</td><td class="mono">${escapeHtml(j.name)}</td><td>${pill(j.state)}</td>
      <td>${progressBar(j)}</td><td class="num">${j.done}${j.total != null ? " / " + j.total : ""}</td>
      <td class="num">${j.running}</td><td class="num">${j.queued}</td><td class="num">${j.failed}</td>
      <td class="num">${formatNumber(j.throughput)}</td><td class="num">${formatDuration(j.elapsed)}</td>
      <td class="num">${formatDuration(j.eta)}</td>
      <td>${j.state === "running" ? `<button class="danger" data-cancel="${j.id}">Cancel</button>` : ""}</td></tr>`).join("");
  const failing = jobs.filter(j => j.failures.length);
  $("failures").innerHTML = failing.map(j => `<details><summary>Job ${j.id} (${escapeHtml(j.name)}):
      ${j.failed} failed task(s)</summary><table><thead><tr><th>Task</th><th>Error</th><th>Message</th>
      <th>Worker</th></tr></thead><tbody>${j.failures.map(f => `<tr><td>${f.task}</td>
      <td class="mono">${escapeHtml(f.type)}</td><td>${escapeHtml(f.message)}</td>
      <td class="mono">${escapeHtml(f.worker ?? "–")}</td></tr>`).join("")}</tbody></table></details>`).join("");
}

function trust(w) {
  const r = w.reputation;
  const state = r.state !== "ok" ? r.state : w.trusted ? "trusted" : "ok";
  const score = r.score == null ? "unchecked" : `${r.agreements}✓ ${r.disagreements}✗ ${r.errors}!`;
  return `<span class="badge badge-${state}" title="${escapeHtml(r.reason || "agreed / disagreed / errors")}">${state}</span>
      <span class="muted" title="agreed / disagreed / unusable results">${score}</span>`;
}

function banButton(w) {
  const barred = w.reputation.state !== "ok";
  return `<button class="${barred ? "" : "danger"}" data-${barred ? "unban" : "ban"}="${escapeHtml(w.id)}">
      ${barred ? "Unban" : "Ban"}</button>`;
}

function renderLeaders(board) {
  const n = x => formatNumber(x);
  if (board.volunteers.length) $("leaders-volunteers").innerHTML = board.volunteers.map(v => `<tr
      data-volunteer="${escapeHtml(v.volunteer)}"><td>${escapeHtml(v.volunteer)}</td><td class="num">${n(v.validated)}</td>
      <td class="num">${n(v.tasks)}</td><td class="num">${n(v.cpu_seconds)}</td><td class="num">${n(v.gpu_seconds)}</td></tr>`).join("");
  if (board.workers.length) $("leaders-workers").innerHTML = board.workers.map(w => `<tr
      data-leader="${escapeHtml(w.worker)}"><td class="mono">${escapeHtml(w.worker)}</td><td>${escapeHtml(w.volunteer ?? "–")}</td>
      <td class="num">${n(w.validated)}</td><td class="num">${n(w.tasks)}</td><td class="num">${n(w.cpu_seconds)}</td>
      <td class="num">${n(w.gpu_seconds)}</td></tr>`).join("");
}

// A worker states its own dashboard address: only an http(s) one becomes a link (never javascript: or data:).
// The foreman checks it too (views.dashboard_link); this is the page's own guard.
function webLink(url) {
  if (typeof url !== "string") return false;
  try { return ["http:", "https:"].includes(new URL(url).protocol); } catch { return false; }
}

function renderWorkers(workers) {
  if (!workers.length) return;
  $("workers").innerHTML = workers.map(w => {
    const name = webLink(w.dashboard)
      ? `<a href="${escapeHtml(w.dashboard)}" target="_blank" rel="noopener noreferrer">${escapeHtml(w.id)}</a>`
      : escapeHtml(w.id);
    const gpus = Array.isArray(w.gpus) && w.gpus.length ? w.gpus.map(g => escapeHtml(g && g.name)).join(", ") : "none";
    const heard = w.connected ? formatDuration(w.last_heartbeat_age) + " ago"
                              : `left ${new Date(w.left_at * 1000).toLocaleTimeString()}`;
    return `<tr class="${w.connected ? "" : "gone"}" data-worker="${escapeHtml(w.id)}"
        title="${escapeHtml(w.left_reason || w.platform || "")}">
      <td class="mono">${name}</td><td>${pill(w.status)}${w.pause_reason
        ? `<div class="muted pause-reason">${escapeHtml(w.pause_reason)}</div>` : ""}</td><td>${escapeHtml(w.host)}</td>
      <td>${escapeHtml(w.machine)}</td><td class="num">${w.cpu_count ?? "–"}</td>
      <td class="num">${formatBytes(typeof w.memory === "number" ? w.memory : null)}</td><td>${gpus}</td>
      <td>${escapeHtml((Array.isArray(w.capabilities) ? w.capabilities : []).join(", ") || "–")}</td>
      <td class="num">${w.tasks_done}</td><td class="num">${w.tasks_failed}</td>
      <td class="num">${w.tasks_running}</td><td class="num">${formatNumber(w.throughput)}</td>
      <td class="num">${heard}</td><td class="trust">${trust(w)}</td>
      <td>${w.connected ? `<button data-restart="${escapeHtml(w.id)}">Restart</button> ${banButton(w)}`
                        : escapeHtml(w.left_reason)}</td></tr>`;
  }).join("");
}

function renderEvents(events) {
  if (!events.length) return;
  $("events").innerHTML = events.slice().reverse().map(e => `<div><span class="muted">
      ${new Date(e.time * 1000).toLocaleTimeString()}</span> <span class="kind">${escapeHtml(e.kind)}</span>
      ${escapeHtml(e.message)}</div>`).join("");
}

function render(s) {
  const t = s.totals;
  $("t-workers").textContent = t.workers_connected;
  $("t-slots").textContent = t.slots;
  $("t-jobs").textContent = t.jobs_running;
  $("t-done").textContent = formatNumber(t.tasks_done);
  $("t-failed").textContent = formatNumber(t.tasks_failed);
  $("t-queued").textContent = formatNumber(t.tasks_queued);
  $("t-reassigned").textContent = t.reassigned;
  rateChart.update(s.series.map(p => [p[0], p[1]]));
  workerChart.update(s.series.map(p => [p[0], p[2]]));
  renderJobs(s.jobs);
  renderWorkers(s.workers);
  renderEvents(s.events);
  renderLeaders(s.leaderboard);
}

document.addEventListener("click", async ev => {
  const cancel = ev.target.dataset.cancel, restart = ev.target.dataset.restart;
  const ban = ev.target.dataset.ban, unban = ev.target.dataset.unban;
  if (ban && confirm(`Ban worker ${ban}? It gets no more work, also after reconnecting.`)) {
    const r = await control(`api/workers/${encodeURIComponent(ban)}/ban`);
    if (!r.ok) alert(`Ban failed: ${r.status} ${(await r.json()).detail}`);
  }
  if (unban) {
    const r = await control(`api/workers/${encodeURIComponent(unban)}/unban`);
    if (!r.ok) alert(`Unban failed: ${r.status} ${(await r.json()).detail}`);
  }
  if (cancel && confirm(`Cancel job ${cancel}? Queued tasks will not run; running ones are stopped.`)) {
    const r = await control(`api/jobs/${cancel}/cancel`);
    if (!r.ok) alert(`Cancel failed: ${r.status} ${(await r.json()).detail}`);
  }
  if (restart && confirm(`Restart worker ${restart}? Its tasks go back to the queue.`)) {
    const r = await control(`api/workers/${encodeURIComponent(restart)}/restart`);
    if (!r.ok) alert(`Restart failed: ${r.status} ${(await r.json()).detail}`);
  }
});

liveSocket("ws", render);
