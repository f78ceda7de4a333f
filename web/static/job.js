// Live status: poll the JSON API and update the page; reload once the job ends so the
// video (or the error) appears. Without JavaScript the page refreshes itself instead.
(function () {
  "use strict";
  const root = document.getElementById("job");
  if (!root || ["succeeded", "failed", "canceled"].includes(root.dataset.state)) return;
  const url = root.dataset.statusUrl;
  const bar = document.getElementById("bar");
  const percent = document.getElementById("percent");
  const state = document.getElementById("state");
  const phase = document.getElementById("phase");
  let attempts = document.querySelectorAll("#attempts tbody tr:not(.message)").length;

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" } });
      if (response.ok) {
        const job = await response.json();
        const pct = Math.round(job.progress * 1000) / 10;
        bar.style.width = pct + "%";
        bar.parentElement.setAttribute("aria-valuenow", Math.round(pct));
        percent.textContent = Math.round(pct) + "%";
        state.textContent = job.state.replace("_", " ");
        phase.textContent = job.phase_text;
        if (["succeeded", "failed", "canceled"].includes(job.state) ||
            job.attempts.length !== attempts) {
          window.location.reload();
          return;
        }
      }
    } catch (err) {
      // A missed poll is not worth an error: try again on the next tick.
    }
    window.setTimeout(poll, 1000);
  }
  window.setTimeout(poll, 1000);
})();
