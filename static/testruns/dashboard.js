// Dashboard: a snapshot (or dashboard.json), then queue broadcasts that reorder the waiting
// list and update the run slots, and progress events of the running runs this user may see.
// Details of a run it does not know yet come from dashboard.json, fetched at most a few
// times a second however many events arrive.
(function () {
  "use strict";
  const root = document.getElementById("dashboard");
  if (!root) return;
  const { h, fetchJSON } = window.Live;
  const el = (id) => document.getElementById(id);
  const FINISHED = ["succeeded", "failed", "error", "cancelled"];
  const state = { version: 0, details: new Map(), running: new Map(), refetchTimer: null };
  window.__dashboard = state;

  function progress(run) {
    const pct = window.Live.progressPercent(run);
    const bar = h("div", { className: "progress", role: "progressbar", "aria-valuemin": 0,
                           "aria-valuemax": 100, "aria-valuenow": pct },
                  h("div", { className: "bar" }));
    bar.firstElementChild.style.width = pct + "%";
    return h("td", {}, bar, h("span", { className: "counts",
                                        text: `${run.done_count}/${run.total_cases}` }));
  }

  function link(run, text) {
    return h("a", { href: run.url, text: text });
  }

  function emptyRow(columns, text) {
    return h("tr", { className: "empty" }, h("td", { colspan: columns, text: text }));
  }

  function renderSlots(slots) {
    const list = el("slots");
    list.replaceChildren(...slots.map(function (slot) {
      const fill = h("span");
      fill.style.width = (slot.limit ? Math.min(100, (100 * slot.in_use) / slot.limit) : 0) + "%";
      return h("li", { dataset: { slot: slot.name } },
        h("span", { className: "label", text: slot.label }),
        h("span", { className: "meter" }, fill),
        h("span", { className: "count", text: `${slot.in_use} / ${slot.limit}` }));
    }));
  }

  function renderRunsSlot(pair) {
    const item = document.querySelector('#slots li[data-slot="runs"]');
    if (!item || !pair) return;
    item.querySelector(".count").textContent = `${pair[0]} / ${pair[1]}`;
    item.querySelector(".meter span").style.width =
      (pair[1] ? Math.min(100, (100 * pair[0]) / pair[1]) : 0) + "%";
  }

  function renderRunning() {
    const rows = [...state.running.values()].map((run) => h("tr", { dataset: { runId: run.id } },
      h("td", {}, link(run, String(run.id))), h("td", { text: `${run.card} v${run.version}` }),
      h("td", { text: run.provider }), progress(run)));
    el("running").replaceChildren(...(rows.length ? rows : [emptyRow(4, "Nothing running.")]));
  }

  function renderWaiting(waiting, total) {
    let unknown = false;
    const rows = waiting.slice(0, 100).map(function ([id, priority], index) {
      const run = state.details.get(id);
      if (run === undefined) unknown = true;
      const cells = run
        ? [h("td", {}, link(run, `#${id} ${run.card} v${run.version}`)),
           h("td", { text: run.provider }), h("td", { text: run.launched_by })]
        : [h("td", { className: "muted", text: `#${id}` + (run === null
             ? " (another user's run)" : "") }), h("td"), h("td")];
      return h("tr", { dataset: { runId: id } }, h("td", { text: `#${index + 1}` }), ...cells,
               h("td", { text: String(priority) }));
    });
    el("waiting").replaceChildren(...(rows.length ? rows : [emptyRow(5, "No run is waiting.")]));
    el("waiting-count").textContent = `(${total})`;
    return unknown;
  }

  function renderRecent(recent) {
    const rows = recent.map((run) => h("tr", { dataset: { runId: run.id } },
      h("td", {}, link(run, String(run.id))), h("td", { text: `${run.card} v${run.version}` }),
      h("td", { text: run.provider }),
      h("td", {}, h("span", { className: "status " + run.status, text: run.status })),
      h("td", { text: `${run.passed_count}/${run.total_cases}` }),
      h("td", {}, h("a", { href: run.url + "report/", text: "Report" }))));
    el("recent").replaceChildren(...(rows.length ? rows : [emptyRow(6, "No finished runs yet.")]));
  }

  function applySnapshot(snapshot) {
    if (snapshot.version < state.version) return;
    state.version = snapshot.version;
    state.details.clear();
    for (const entry of snapshot.waiting) state.details.set(entry.id, entry.run);
    state.running = new Map(snapshot.running.map((run) => [run.id, run]));
    renderSlots(snapshot.slots);
    renderRunning();
    renderWaiting(snapshot.waiting.map((e) => [e.id, e.priority]), snapshot.waiting_count);
    renderRecent(snapshot.recent);
  }

  function applyQueue(queue) {
    if (queue.version <= state.version) return; // overtaken by a newer broadcast
    state.version = queue.version;
    renderRunsSlot(queue.slots);
    const unknown = renderWaiting(queue.waiting, queue.waiting.length);
    const started = queue.running.some((id) => !state.running.has(id));
    if (unknown || started) refetchSoon();
  }

  function applyRun(message) {
    const run = state.running.get(message.run_id);
    if (!run) { refetchSoon(); return; }
    if (message.seq <= (run.seq || 0)) return;
    run.seq = message.seq;
    Object.assign(run, message.run);
    if (FINISHED.includes(run.status)) {
      refetchSoon(); // moves to "recently finished", with fresh slot counts
      return;
    }
    const row = el("running").querySelector(`tr[data-run-id="${run.id}"]`);
    if (row) row.lastElementChild.replaceWith(progress(run));
  }

  function refetchSoon() {
    if (state.refetchTimer) return;
    state.refetchTimer = setTimeout(async function () {
      state.refetchTimer = null;
      try { applySnapshot(await fetchJSON(root.dataset.jsonUrl)); } catch (_) { /* retry later */ }
    }, 300);
  }

  window.Live.connect({
    path: root.dataset.wsPath,
    poll: refetchSoon,
    pollMs: 3000,
    onStatus: (text) => { el("live").textContent = text; },
    onMessage: function (message) {
      if (message.type === "snapshot") applySnapshot(message);
      else if (message.type === "queue") applyQueue(message);
      else if (message.type === "run") applyRun(message);
    },
  });
})();
