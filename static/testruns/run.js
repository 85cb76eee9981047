// Live run page: a snapshot, then numbered deltas over a WebSocket. Events the snapshot
// already holds are dropped; a gap asks for a new snapshot. While the run waits, the page
// shows its place from the queue broadcasts (the newest version wins). Without a WebSocket
// the page polls the same snapshot as JSON. The table keeps at most `liveRows` rows (the
// latest by position); the rest is paged over HTTP. Output only ever goes into textContent.
(function () {
  "use strict";
  const root = document.getElementById("run");
  if (!root) return;
  const { h, fetchJSON, csrfToken, formatSeconds } = window.Live;
  const el = (id) => document.getElementById(id);
  const runId = Number(root.dataset.runId);
  const liveRows = Number(root.dataset.liveRows) || 100;
  const FINISHED = ["succeeded", "failed", "error", "cancelled"];
  const state = {
    seq: -1, run: null, rows: new Map(), queue: null, queueVersion: 0,
    waitedBase: null, waitedAt: 0, browsing: 0, pages: 1, live: null,
  };
  window.__runPage = state; // for tests and the curious

  // --- Run state ------------------------------------------------------------------------

  function renderRun(run) {
    state.run = Object.assign(state.run || {}, run);
    const r = state.run;
    const status = el("run-status");
    status.textContent = r.status;
    status.className = "status " + r.status;
    el("run-phase").textContent = r.status === "running" ? "Phase: " + r.phase : "";
    const pct = window.Live.progressPercent(r);
    const bar = root.querySelector(".progress");
    bar.setAttribute("aria-valuenow", pct);
    bar.setAttribute("aria-valuemax", 100);
    bar.firstElementChild.style.width = pct + "%";
    // With repeats, progress is in model calls: a case is done only after all of its calls.
    const calls = r.calls_total > r.total_cases
      ? ` · ${Math.min(r.calls_done, r.calls_total)}/${r.calls_total} calls` : "";
    el("run-counts").textContent =
      `${r.done_count}/${r.total_cases} cases done${calls} · ${r.passed_count} passed · ` +
      `${r.failed_count} failed · ${r.error_count} errors (${pct} %)`;
    if (r.tokens_in !== undefined) {
      el("run-usage").textContent =
        `${r.tokens_in} tokens in · ${r.tokens_out} out · cost ${window.Live.dollars(r.cost)}`;
    }
    const finished = FINISHED.includes(r.status);
    el("run-report").hidden = !finished;
    const cancel = el("run-cancel");
    if (cancel && finished) cancel.hidden = true;
    if (r.status !== "queued") el("run-queue").hidden = true;
    renderQueue();
  }

  function renderQueue() {
    const r = state.run;
    const panel = el("run-queue");
    if (!r || r.status !== "queued") { panel.hidden = true; return; }
    panel.hidden = false;
    const q = state.queue;
    if (q && q.position) {
      el("run-position").textContent = `You are #${q.position} in the queue`;
      el("run-position").dataset.position = q.position;
      const limit = q.slots ? q.slots[1] : 0;
      el("run-estimate").textContent = q.recent_run_seconds && limit
        ? "· estimated start in about " +
          formatSeconds(Math.ceil(q.position / limit) * q.recent_run_seconds) +
          " (from recent run durations)"
        : "";
    } else {
      el("run-position").textContent = "Starting…";
      delete el("run-position").dataset.position;
    }
  }

  function applyQueue(queue) {
    if (!queue || queue.version < state.queueVersion) return; // overtaken by a newer one
    state.queueVersion = queue.version;
    state.queue = Object.assign(state.queue || {}, queue);
    renderQueue();
  }

  function tick() {
    const r = state.run;
    if (r && r.status === "queued" && state.waitedBase !== null) {
      const waited = state.waitedBase + (Date.now() - state.waitedAt) / 1000;
      el("run-waited").textContent = "Waiting for " + formatSeconds(waited);
    }
  }

  // --- Result rows ----------------------------------------------------------------------

  function assertionList(outcomes) {
    const list = h("ul", { className: "assertions" });
    for (const o of outcomes || []) {
      const mark = o.error ? "⚠ " : o.passed ? "✓ " : "✗ ";
      list.append(h("li", { className: o.error ? "error" : o.passed ? "pass" : "fail" },
        mark + o.type + (o.reason ? " — " + o.reason : "")));
    }
    return list;
  }

  // pass^N: "repeat 1 ✓ 2 ✗ 3 ✓", each mark opening the start of that repeat's output.
  function repeatList(repeats) {
    if (!repeats || !repeats.length) return null;
    const box = h("div", { className: "repeats" }, "repeat");
    repeats.forEach(function (r, i) {
      box.append(" ", h("details", { className: "repeat" },
        h("summary", { className: r.passed ? "pass" : "fail",
                       text: `${i + 1} ${r.passed ? "✓" : "✗"}` }),
        h("pre", { className: "output", text: r.output || "" })));
    });
    return box;
  }

  // A row's detail (prompts, variables, whole output, every repeat) is the report's, fetched
  // as server-rendered, escaped HTML when the row is expanded.
  async function toggleDetail(row, result) {
    const next = row.nextElementSibling;
    if (next && next.classList.contains("detail-row")) { next.remove(); return; }
    const cell = h("td", { colspan: 8, text: "Loading…" });
    const detailRow = h("tr", { className: "detail-row" }, cell);
    row.after(detailRow);
    try {
      const response = await fetch(`/runs/${runId}/results/${result.position}/detail/`,
                                   { credentials: "same-origin" });
      if (!response.ok) throw new Error(response.status);
      const html = new DOMParser().parseFromString(await response.text(), "text/html");
      cell.textContent = "";
      cell.append(...html.body.childNodes);
    } catch (_) {
      cell.textContent = "The detail could not be loaded; the report has it.";
    }
  }

  function resultRow(result) {
    const output = result.error || result.output || "";
    const more = h("button", { type: "button", className: "secondary small", text: "Detail",
                               dataset: { detail: result.position } });
    const row = h("tr", { dataset: { resultId: result.id, position: result.position } },
      h("td", { text: String(result.position + 1) }),
      h("td", {}, result.case_name, " ", more),
      h("td", { className: "status " + result.status, text: result.status }),
      h("td", {}, h("pre", { className: "output", text: output }), repeatList(result.repeats)),
      h("td", {}, assertionList(result.assertion_results)),
      h("td", { text: result.latency_ms == null ? "" : Math.round(result.latency_ms) + " ms" }),
      h("td", { text: result.tokens_in || result.tokens_out
        ? `${result.tokens_in}/${result.tokens_out}` : "" }),
      h("td", { text: result.cost ? window.Live.dollars(result.cost) : "" }));
    more.addEventListener("click", () => toggleDetail(row, result));
    return row;
  }

  function renderResult(result) {
    if (state.browsing) return; // a browsed page holds finished rows only; they never change
    const body = el("run-results");
    const old = state.rows.get(result.id);
    const row = resultRow(result);
    if (old) {
      old.replaceWith(row);
    } else {
      // Keep the rows ordered by position; most arrive at the end.
      let after = null;
      for (let node = body.lastElementChild; node; node = node.previousElementSibling) {
        if (Number(node.dataset.position) < result.position) break;
        after = node;
      }
      body.insertBefore(row, after);
    }
    state.rows.set(result.id, row);
    // Cap the DOM: drop the lowest positions; they are a page away over HTTP.
    while (state.rows.size > liveRows) {
      const first = body.firstElementChild;
      state.rows.delete(Number(first.dataset.resultId));
      first.remove();
    }
    updatePager();
  }

  function updatePager() {
    const r = state.run;
    const finished = r ? r.done_count : 0;
    const pager = el("run-pager");
    pager.hidden = !state.browsing && finished <= liveRows;
    if (state.browsing) {
      el("run-window").textContent = "";
      el("run-page-label").textContent = `page ${state.browsing} of ${state.pages}`;
    } else {
      el("run-window").textContent = `Showing the latest ${state.rows.size} of ${finished} ` +
        "finished cases.";
      el("run-page-label").textContent = "";
    }
    pager.querySelector("[data-page=live]").hidden = !state.browsing;
    pager.querySelector("[data-page=first]").hidden = Boolean(state.browsing);
    pager.querySelector("[data-page=prev]").hidden = state.browsing <= 1;
    pager.querySelector("[data-page=next]").hidden =
      !state.browsing || state.browsing >= state.pages;
  }

  async function browse(page) {
    const data = await fetchJSON(root.dataset.resultsUrl + "?page=" + page);
    state.browsing = data.page;
    state.pages = data.pages;
    state.rows.clear();
    const body = el("run-results");
    body.replaceChildren(...data.results.map(resultRow));
    updatePager();
  }

  function backToLive() {
    state.browsing = 0;
    state.rows.clear();
    el("run-results").replaceChildren();
    resync();
  }

  el("run-pager").addEventListener("click", function (event) {
    const which = event.target.dataset.page;
    if (which === "live") backToLive();
    else if (which === "first") browse(1);
    else if (which === "prev") browse(state.browsing - 1);
    else if (which === "next") browse(state.browsing + 1);
  });

  // --- Snapshots and events -------------------------------------------------------------

  function applySnapshot(snapshot) {
    if (snapshot.seq < state.seq) return; // an older poll answer overtaken by an event
    state.seq = snapshot.seq;
    renderRun(snapshot.run);
    if (snapshot.queue) {
      state.waitedBase = snapshot.queue.waited_seconds;
      state.waitedAt = Date.now();
      applyQueue(snapshot.queue);
    }
    snapshot.results.forEach(renderResult);
    updatePager();
  }

  function applyEvent(event) {
    if (event.seq <= state.seq) return; // already in the snapshot
    if (event.seq > state.seq + 1) {
      resync(); // a gap: something was missed
      return;
    }
    state.seq = event.seq;
    const data = event.data || {};
    (data.results || []).forEach(renderResult);
    if (data.run) renderRun(data.run);
    // More rows finished at once than an event carries: take them from a snapshot.
    if (data.more_results && !state.browsing) resync();
  }

  async function poll() {
    try {
      applySnapshot(await fetchJSON(root.dataset.statusUrl));
    } catch (_) { /* offline: try again on the next tick */ }
  }

  function resync() {
    if (!state.live || !state.live.send({ type: "resync" })) poll();
  }

  state.live = window.Live.connect({
    path: root.dataset.wsPath,
    poll: poll,
    onStatus: (text) => { el("run-live").textContent = text; },
    onMessage: function (message) {
      if (message.type === "snapshot") applySnapshot(message);
      else if (message.type === "queue") applyQueue(message);
      else applyEvent(message);
    },
  });

  // --- Cancel ---------------------------------------------------------------------------

  const cancel = el("run-cancel");
  if (cancel) {
    cancel.addEventListener("submit", async function (event) {
      event.preventDefault();
      if (!window.confirm("Cancel this run? Finished cases are kept.")) return;
      cancel.querySelector("button").disabled = true;
      const response = await fetch(root.dataset.cancelUrl, {
        method: "POST", credentials: "same-origin",
        headers: { "X-CSRFToken": csrfToken(), Accept: "application/json" },
      });
      if (!response.ok) cancel.querySelector("button").disabled = false;
      // The cancelled state arrives as an event like every other change.
    });
  }

  setInterval(tick, 1000);
})();
