// The form's model menu: choosing another model puts its defaults (GET /api/v1/models) in the
// fields still at the previous model's, and its sizes in the size menu. Without JavaScript the
// form keeps the defaults of the model it was drawn for.
(function () {
  "use strict";
  const select = document.getElementById("model");
  if (!select || !select.dataset.models) return;
  let listing = null;
  let current = select.value;

  const find = function (id) {
    return listing ? listing.models.find(function (m) { return m.id === id; }) : undefined;
  };
  const shape = function (w, h) {
    return w === h ? "square" : (w > h ? "landscape" : "portrait");
  };

  select.addEventListener("change", function () {
    const chosen = select.value;
    const ready = listing ? Promise.resolve(listing) : fetch(select.dataset.models, {
      headers: { Accept: "application/json" },
    }).then(function (response) { return response.json(); });
    ready.then(function (body) {
      listing = body;
      const before = find(current);
      const after = find(chosen);
      current = chosen;
      if (!after) return;
      Object.keys(after.defaults).forEach(function (name) {
        const input = document.getElementById(name);
        if (!input || input.tagName !== "INPUT" || input.type !== "number") return;
        const old = before ? before.defaults[name] : undefined;
        // A value typed by hand stays; one still at the old model's default follows.
        if (old === undefined || String(input.value) === String(old)) {
          input.value = after.defaults[name];
        }
      });
      const menu = document.getElementById("size-preset");
      if (menu) {
        Array.from(menu.options).forEach(function (o) {
          if (/^\d+x\d+$/.test(o.value)) o.remove();
        });
        const custom = menu.querySelector('option[value="custom"]');
        (after.defaults.sizes || []).forEach(function (s) {
          const label = s.width + " x " + s.height + " (" + shape(s.width, s.height) + ")";
          menu.insertBefore(new Option(label, s.width + "x" + s.height), custom);
        });
        menu.value = "";
      }
      const help = document.getElementById("model-defaults");
      if (help) help.textContent = after.id;
    });
  });
}());
