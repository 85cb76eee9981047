// Comparison page: while any of its runs is unfinished, each column header follows its run
// live; once they have all finished, the case table is fetched again (server-rendered and
// escaped) instead of asking for a reload.
(function () {
  "use strict";
  const root = document.getElementById("compare");
  if (!root) return;
  const FINISHED = ["succeeded", "failed", "error", "cancelled"];
  const headers = [...root.querySelectorAll("th.run-column")];
  const pending = new Set();

  async function refreshTable() {
    const response = await fetch(location.href, { credentials: "same-origin" });
    if (!response.ok) return;
    const html = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = html.getElementById("compare");
    if (fresh) root.replaceWith(fresh);
  }

  function update(header, run) {
    const status = header.querySelector("[data-role=status]");
    status.textContent = run.status;
    status.className = "status " + run.status;
    header.querySelector("[data-role=counts]").textContent =
      `${run.passed_count}/${run.total_cases} passed`;
    const pct = run.total_cases ? Math.floor((100 * run.done_count) / run.total_cases) : 0;
    header.querySelector(".progress .bar").style.width = pct + "%";
    if (FINISHED.includes(run.status) && pending.delete(header.dataset.runId)) {
      if (!pending.size) refreshTable();
    }
  }

  for (const header of headers) {
    const status = header.querySelector("[data-role=status]").textContent.trim();
    if (FINISHED.includes(status)) continue;
    pending.add(header.dataset.runId);
    let seq = -1;
    const live = window.Live.connect({
      path: `/ws/runs/${header.dataset.runId}/`,
      poll: async function () {
        try {
          const snapshot = await window.Live.fetchJSON(`/runs/${header.dataset.runId}/status.json`);
          if (snapshot.seq >= seq) { seq = snapshot.seq; update(header, snapshot.run); }
        } catch (_) { /* try again */ }
      },
      onMessage: function (message) {
        if (message.type === "snapshot") { seq = message.seq; update(header, message.run); }
        else if (message.type !== "queue" && message.seq > seq) {
          if (message.seq > seq + 1) { live.send({ type: "resync" }); return; }
          seq = message.seq;
          update(header, message.data.run);
        }
      },
    });
  }
})();
