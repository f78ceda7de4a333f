// Live status: follow the job's event stream (server-sent events: its progress and preview as
// they change, its events as they happen) and update the page; reload once the job's state
// changes (or an attempt fails) so the video, the error and the attempts appear. Without
// EventSource, or when the stream keeps failing, poll the JSON API once a second instead;
// without JavaScript the page refreshes itself (a <noscript> meta refresh).
(function () {
  "use strict";
  const ENDED = ["succeeded", "failed", "canceled"];
  const root = document.getElementById("job");
  if (!root || ENDED.includes(root.dataset.state)) return;
  const url = root.dataset.statusUrl;
  const eventsUrl = root.dataset.eventsUrl;
  const bar = document.getElementById("bar");
  const percent = document.getElementById("percent");
  const eta = document.getElementById("eta");
  const state = document.getElementById("state");
  const stateLine = document.getElementById("state-line");
  const phase = document.getElementById("phase");
  const waiting = document.getElementById("waiting");
  const place = document.getElementById("place");
  const preview = document.getElementById("preview");
  const previewFigure = document.getElementById("preview-figure");
  const attempts = document.querySelectorAll("#attempts tbody tr:not(.message)").length;
  let lastState = root.dataset.state;
  // The seconds behind the time left on screen: a later estimate above them is not shown, so
  // the time left never grows. Once a step overruns the server says how long it has run
  // (eta_s null); the estimate made after it starts afresh.
  let shownEta = eta && eta.dataset.etaS ? parseFloat(eta.dataset.etaS) : null;

  function showEta(job) {
    if (!eta) return;
    if (job.eta_s === null || job.eta_s === undefined) {
      eta.textContent = job.eta_text || "";
      shownEta = null;
      return;
    }
    if (shownEta !== null && job.eta_s > shownEta) return;
    eta.textContent = job.eta_text || "";
    shownEta = job.eta_s;
  }

  function ordinal(n) {
    const tens = n % 100;
    const suffix = tens >= 10 && tens <= 20 ? "th" : ({ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th");
    return n + suffix;
  }

  function minutes(seconds) {
    return seconds < 60 ? Math.max(1, Math.round(seconds)) + " s" : Math.round(seconds / 60) + " min";
  }

  // The queued job's place as the page says it: "3rd in line, starts in about 4 min."
  function placeText(p) {
    if (!p) return "";
    let text = p.position === 0 ? "Sent to a worker: it starts next" : ordinal(p.position) + " in line";
    if (p.eta_seconds !== null && p.eta_seconds !== undefined) {
      text += ", starts in about " + minutes(p.eta_seconds);
    }
    text += ".";
    if (p.held) text += " Held back: " + p.held.charAt(0).toUpperCase() + p.held.slice(1) + ".";
    return text;
  }

  function show(job) {
    if (job.progress === undefined) return;
    const pct = Math.round(job.progress * 1000) / 10;
    if (bar) {
      bar.value = pct;
      bar.textContent = Math.round(pct) + "%";
    }
    if (percent) percent.textContent = Math.round(pct) + "%";
    showEta(job);
    state.textContent = job.state.replace("_", " ");
    stateLine.className = "state state-" + job.state;
    phase.textContent = job.phase_label;
    if (place && "place" in job) place.textContent = placeText(job.place);
    // A new preview is a new URL (?step=N): load it only when it changed.
    if (preview && job.preview_url && preview.getAttribute("src") !== job.preview_url) {
      preview.src = job.preview_url;
      if (previewFigure) previewFigure.hidden = false;
    }
    if (waiting && job.waiting) {
      const text = job.waiting.replace(/^waiting: /, "");
      waiting.textContent = text.charAt(0).toUpperCase() + text.slice(1) + ".";
    }
  }

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const job = await response.json();
        show(job);
        // A new state (queued -> running, a cancel requested) or attempt changes more of the
        // page than the bar: load it again.
        if (ENDED.includes(job.state) || job.state !== lastState ||
            job.attempts.length !== attempts) {
          lastState = job.state;
          window.location.reload();
          return;
        }
      }
    } catch (err) {
      // A missed poll is not worth an error: try again on the next tick.
    }
    window.setTimeout(poll, 1000);
  }
  // One JSON read (after an event that changes more than the bar: a published job's place).
  async function refresh() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (response.ok) show(await response.json());
    } catch (err) {
      // The next event brings the page up to date.
    }
  }

  function follow() {
    const source = new EventSource(eventsUrl);
    let failures = 0;
    source.addEventListener("progress", function (e) {
      failures = 0;
      show(JSON.parse(e.data));
    });
    source.addEventListener("event", function (e) {
      failures = 0;
      const event = JSON.parse(e.data);
      if (event.type === "phase") return; // its progress message follows
      if (event.state !== lastState || event.type === "attempt_failed" ||
          ENDED.includes(event.state)) {
        source.close();
        lastState = event.state;
        window.location.reload();
        return;
      }
      refresh();
    });
    // EventSource reconnects by itself (resuming after the last event id); after a few
    // failures in a row, fall back to polling.
    source.onerror = function () {
      failures += 1;
      if (failures >= 3) {
        source.close();
        window.setTimeout(poll, 1000);
      }
    };
  }

  if (eventsUrl && window.EventSource) {
    follow();
  } else {
    window.setTimeout(poll, 1000);
  }
})();
