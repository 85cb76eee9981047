// Live run page: a snapshot, then numbered deltas over a WebSocket. Events the snapshot
// already holds are dropped; a gap asks for a new snapshot. Without a WebSocket the page
// polls the same snapshot as JSON. Output is untrusted: it only ever goes into textContent.
(function () {
  "use strict";
  const root = document.getElementById("run");
  if (!root) return;
  const el = (id) => document.getElementById(id);
  const state = { seq: -1, run: null, rows: new Map(), socket: null, retry: 0, pollTimer: null };

  function renderRun(run) {
    state.run = Object.assign(state.run || {}, run);
    const r = state.run;
    const status = el("run-status");
    status.textContent = r.status + (r.phase && r.status === "running" ? " · " + r.phase : "");
    status.className = "status " + r.status;
    const pct = r.total_cases ? Math.round((100 * r.done_count) / r.total_cases) : 0;
    el("run-bar").style.width = pct + "%";
    el("run-counts").textContent =
      `${r.done_count}/${r.total_cases} done · ${r.passed_count} passed · ` +
      `${r.failed_count} failed · ${r.error_count} errors (${pct} %)`;
    const queue = el("run-queue");
    if (r.status === "queued" && r.queue_position) {
      queue.hidden = false;
      queue.textContent = `You are #${r.queue_position} in the queue`;
    } else {
      queue.hidden = true;
    }
  }

  function renderResult(result) {
    let row = state.rows.get(result.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.resultId = result.id;
      for (let i = 0; i < 5; i++) row.appendChild(document.createElement("td"));
      const body = el("run-results");
      const after = [...body.children].find((r) => Number(r.dataset.position) > result.position);
      body.insertBefore(row, after || null);
      state.rows.set(result.id, row);
    }
    row.dataset.position = result.position;
    const cells = row.children;
    cells[0].textContent = result.position + 1;
    cells[1].textContent = result.case_name;
    cells[2].textContent = result.status;
    cells[2].className = "status " + result.status;
    cells[3].textContent = result.error || result.output;
    cells[4].textContent = result.latency_ms == null ? "" : Math.round(result.latency_ms) + " ms";
  }

  function applySnapshot(snapshot) {
    state.seq = snapshot.seq;
    renderRun(snapshot.run);
    snapshot.results.forEach(renderResult);
  }

  function applyEvent(event) {
    if (event.seq <= state.seq) return; // already in the snapshot
    if (event.seq > state.seq + 1) {
      send({ type: "resync" }); // a gap: something was missed
      return;
    }
    state.seq = event.seq;
    const data = event.data || {};
    (data.results || []).forEach(renderResult);
    if (data.run) renderRun(data.run);
  }

  function send(message) {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify(message));
    }
  }

  async function poll() {
    try {
      const response = await fetch(root.dataset.statusUrl, { credentials: "same-origin" });
      if (response.ok) applySnapshot(await response.json());
    } catch (_) { /* offline: try again on the next tick */ }
  }

  function startPolling() {
    if (!state.pollTimer) state.pollTimer = setInterval(poll, 2000);
  }

  function stopPolling() {
    clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  function connect() {
    if (!("WebSocket" in window)) { el("run-live").textContent = "polling"; startPolling(); return; }
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + location.host + root.dataset.wsPath);
    state.socket = socket;
    socket.onopen = () => { state.retry = 0; el("run-live").textContent = "live"; stopPolling(); };
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "snapshot") applySnapshot(event);
      else applyEvent(event);
    };
    socket.onclose = (close) => {
      state.socket = null;
      if (close.code === 4403) { el("run-live").textContent = "not allowed"; return; }
      el("run-live").textContent = "reconnecting…";
      startPolling();
      // Exponential backoff with jitter, so a restarted server is not stampeded.
      const delay = Math.min(30000, 500 * 2 ** state.retry) * (0.5 + Math.random() / 2);
      state.retry += 1;
      setTimeout(connect, delay);
    };
  }

  connect();
})();
