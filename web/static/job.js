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

  // The stream sends progress only when it changes; between messages the page keeps the time
  // left going itself from the message's pace (as the server would say it, web/jobs.py):
  // counting down, then, once the step has run far longer than the ones before it, which
  // step runs and for how long.
  let pace = null;
  let paceAt = 0;

  function etaText(seconds) {
    if (seconds < 10) return "a few seconds left";
    if (seconds < 90) return "about " + Math.round(seconds / 5) * 5 + " s left";
    if (seconds < 90 * 60) return "about " + Math.round(seconds / 60) + " min left";
    return "about " + (seconds / 3600).toFixed(1) + " h left";
  }

  function took(seconds) {
    if (seconds < 60) return Math.floor(seconds) + " s";
    const total = Math.round(seconds);
    const mins = Math.floor(total / 60);
    const pad = function (n) { return String(n).padStart(2, "0"); };
    if (mins < 60) return mins + " min " + pad(total % 60) + " s";
    return Math.floor(mins / 60) + " h " + pad(mins % 60) + " min";
  }

  function clock() {
    if (!pace || !eta) return;
    const since = (performance.now() - paceAt) / 1000;
    const waited = pace.waited_s + since;
    if (waited >= pace.overrun_after_s) {
      eta.textContent = pace.running_for + took(waited);
      shownEta = null;
      return;
    }
    const left = Math.max(0, pace.left_s - since);
    showEta({ eta_s: left, eta_text: etaText(left) });
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
    // A new preview is a new URL (?step=N): load it only when it changed (the stream names
    // it by its path, the JSON API by its whole URL: compare them resolved).
    const previewUrl = job.preview_url ? new URL(job.preview_url, document.baseURI).href : "";
    if (preview && previewUrl && preview.src !== previewUrl) {
      preview.src = previewUrl;
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
  // One JSON read (after an event that changes more than the bar: a published job's place);
  // a new attempt row (written after the claim, with no event of its own) loads the page again.
  async function refresh() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const job = await response.json();
        show(job);
        if (job.attempts && job.attempts.length !== attempts) window.location.reload();
      }
    } catch (err) {
      // The next event brings the page up to date.
    }
  }

  // The ids of the events the page has: those its timeline shows, then each one received.
  const seen = new Set();
  document.querySelectorAll("#timeline li.event").forEach(function (item) {
    seen.add(item.id.replace("event-", ""));
  });

  // The stream from after the last event the page shows: those before are drawn already,
  // and replayed they would each read the JSON again and reload the page again (one
  // attempt_failed in the job's past: a reload loop until the job ends).
  function streamUrl() {
    let last = 0;
    seen.forEach(function (id) { last = Math.max(last, parseInt(id, 10) || 0); });
    if (!last) return eventsUrl;
    return eventsUrl + (eventsUrl.includes("?") ? "&" : "?") + "after=" + last;
  }

  function follow() {
    const source = new EventSource(streamUrl());
    let failures = 0;
    source.addEventListener("progress", function (e) {
      failures = 0;
      const job = JSON.parse(e.data);
      show(job);
      pace = job.pace || null;
      paceAt = performance.now();
    });
    window.setInterval(clock, 1000);
    source.addEventListener("event", function (e) {
      failures = 0;
      // One the page has already: the live feed may pass on an event written just before the
      // page was drawn (or before a reconnect's Last-Event-ID), after the stream's replay.
      if (seen.has(e.lastEventId)) return;
      seen.add(e.lastEventId);
      const event = JSON.parse(e.data);
      // Its progress message follows; but a page drawn before the attempt's row was
      // written (the claim reloads it) reads the JSON once to show it.
      if (event.type === "phase" && attempts > 0) return;
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
