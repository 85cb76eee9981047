// Comparison page: while any of its runs is unfinished, each column header follows its run
// live; once they have all finished, the case table is fetched again (server-rendered and
// escaped) instead of asking for a reload.
// History page: the "Compare selected" button waits for two ticked runs. Without this script
// the form still works: the server takes the ticked runs as repeated ?runs= parameters.
(function () {
  "use strict";
  const form = document.getElementById("compare-form");
  if (!form) return;
  const button = document.getElementById("compare-selected");
  const hint = document.getElementById("compare-hint");
  const boxes = () => [...document.querySelectorAll("input[name=runs][form=compare-form]")];

  function refresh() {
    const picked = boxes().filter((box) => box.checked).length;
    button.disabled = picked < 2;
    hint.textContent = picked ? `${picked} run${picked === 1 ? "" : "s"} ticked` +
      (picked < 2 ? ": tick one more." : ".") : hint.dataset.hint;
  }

  document.addEventListener("change", (event) => {
    if (event.target.matches("input[name=runs][form=compare-form]")) refresh();
  });
  refresh();
})();

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
