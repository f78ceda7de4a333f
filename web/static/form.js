// The submit form's helpers: the size menu fills width and height with one of the model's
// sizes (and follows what is typed in them), and a chosen file says it replaces the stored
// image of "render again". Without JavaScript the menu stays hidden; the fields work alone.
(function () {
  "use strict";
  const presets = document.getElementById("size-presets");
  const menu = document.getElementById("size-preset");
  const width = document.getElementById("width");
  const height = document.getElementById("height");
  if (presets && menu && width && height) {
    presets.hidden = false;

    // The menu names the size the two fields hold: a preset, auto (both blank) or custom.
    const follow = function () {
      const size = width.value + "x" + height.value;
      const known = Array.from(menu.options).some(function (o) { return o.value === size; });
      if (!width.value && !height.value) menu.value = "";
      else menu.value = known ? size : "custom";
    };
    menu.addEventListener("change", function () {
      const parts = menu.value.split("x");
      width.value = parts.length === 2 ? parts[0] : "";
      height.value = parts.length === 2 ? parts[1] : "";
    });
    width.addEventListener("input", follow);
    height.addEventListener("input", follow);
    follow();
  }

  const image = document.getElementById("image");
  const replaced = document.getElementById("stored-input-replaced");
  if (image && replaced) {
    image.addEventListener("change", function () {
      replaced.hidden = !(image.files && image.files.length);
    });
  }
})();
