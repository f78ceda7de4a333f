// The submit form's helpers: the size menu fills width and height with one of the model's
// sizes (and follows what is typed in them), and a chosen file says it replaces the stored
// image of "render again"; chosen, dropped or pasted images show as previews. Without
// JavaScript the menu stays hidden; the fields work alone.
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

  // Previews of the chosen images; images dropped on the field or pasted into the page are
  // added to the chosen files (several images make a batch).
  const previews = document.getElementById("previews");
  const zone = document.getElementById("dropzone");
  const ACCEPTED = ["image/png", "image/jpeg", "image/webp"];
  if (!image || !previews || !zone) return;

  const showPreviews = function () {
    previews.replaceChildren();
    const files = Array.from(image.files || []);
    previews.hidden = files.length === 0;
    files.forEach(function (file) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = file.name;
      img.src = URL.createObjectURL(file);
      img.onload = function () { URL.revokeObjectURL(img.src); };
      const caption = document.createElement("figcaption");
      caption.textContent = file.name;
      figure.append(img, caption);
      previews.append(figure);
    });
  };
  const addFiles = function (files) {
    const added = Array.from(files).filter(function (f) { return ACCEPTED.includes(f.type); });
    if (!added.length || typeof DataTransfer === "undefined") return;
    const all = new DataTransfer();
    Array.from(image.files || []).concat(added).forEach(function (f) { all.items.add(f); });
    image.files = all.files;
    image.dispatchEvent(new Event("change"));
  };
  image.addEventListener("change", showPreviews);
  zone.addEventListener("dragover", function (event) {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", function () { zone.classList.remove("dragging"); });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer) addFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", function (event) {
    if (event.clipboardData && event.clipboardData.files.length) {
      addFiles(event.clipboardData.files);
    }
  });
  showPreviews();
})();
