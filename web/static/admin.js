// The admin pages' small behaviours, from a file because the Content-Security-Policy forbids
// inline handlers (onclick="..."):
// - a checkbox with data-select-all="<selector>" checks or clears every box the selector finds;
// - a button or link with data-confirm="<question>" goes ahead only when the person confirms.
(function () {
  "use strict";
  for (const box of document.querySelectorAll("input[type=checkbox][data-select-all]")) {
    box.addEventListener("change", function () {
      for (const other of document.querySelectorAll(box.dataset.selectAll)) {
        other.checked = box.checked;
      }
    });
  }
  for (const control of document.querySelectorAll("[data-confirm]")) {
    control.addEventListener("click", function (event) {
      if (!window.confirm(control.dataset.confirm)) event.preventDefault();
    });
  }
})();
