// Shared by the live pages. A WebSocket that reconnects with exponential backoff and jitter
// and, while it is down (or missing), polls a JSON endpoint instead; and a small element
// builder. Untrusted text (model output, names) only ever goes into textContent.
window.Live = (function () {
  "use strict";

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  async function fetchJSON(url) {
    const response = await fetch(url, { credentials: "same-origin",
                                        headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(url + ": " + response.status);
    return response.json();
  }

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (match) return decodeURIComponent(match[1]);
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  // connect({path, onMessage, onStatus, poll, pollMs}) -> {send, close}
  function connect(options) {
    let socket = null;
    let retry = 0;
    let pollTimer = null;
    const status = options.onStatus || function () {};

    function startPolling() {
      if (pollTimer || !options.poll) return;
      options.poll();
      pollTimer = setInterval(options.poll, options.pollMs || 2000);
    }

    function stopPolling() {
      clearInterval(pollTimer);
      pollTimer = null;
    }

    function open() {
      if (!("WebSocket" in window)) {
        status("polling");
        startPolling();
        return;
      }
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      socket = new WebSocket(scheme + location.host + options.path);
      socket.onopen = function () {
        retry = 0;
        status("live");
        stopPolling();
      };
      socket.onmessage = function (message) {
        options.onMessage(JSON.parse(message.data));
      };
      socket.onclose = function (close) {
        socket = null;
        if (close.code === 4403) {
          status("not allowed");
          return;
        }
        status("reconnecting…");
        startPolling();
        // Exponential backoff with jitter, so a restarted server is not stampeded.
        const delay = Math.min(30000, 500 * 2 ** retry) * (0.5 + Math.random() / 2);
        retry += 1;
        setTimeout(open, delay);
      };
    }

    open();
    return {
      send: function (message) {
        if (socket && socket.readyState === WebSocket.OPEN) {
          socket.send(JSON.stringify(message));
          return true;
        }
        return false;
      },
    };
  }

  function formatSeconds(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
    seconds = Math.max(0, Math.round(seconds));
    const m = Math.floor(seconds / 60);
    const s = seconds % 60;
    if (m >= 60) return Math.floor(m / 60) + " h " + (m % 60) + " min";
    return m ? m + " min " + String(s).padStart(2, "0") + " s" : s + " s";
  }

  // Progress of a run in model calls (cases x repeats), as the server's progress_percent; a
  // state without the call counts (an older event) falls back to cases.
  function progressPercent(run) {
    if (run.calls_total) return Math.min(100, Math.floor((100 * run.calls_done) / run.calls_total));
    return run.total_cases ? Math.floor((100 * run.done_count) / run.total_cases) : 0;
  }

  function dollars(value) {
    return "$" + Number(value || 0).toFixed(6);
  }

  return { h, fetchJSON, csrfToken, connect, formatSeconds, progressPercent, dollars };
})();
