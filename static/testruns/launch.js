// Launch page: another card reloads the form with its versions and cases; the tag and case
// pickers show only for the selection that uses them. Without JS, everything still works.
(function () {
  "use strict";
  const picker = document.getElementById("pick-card");
  if (picker) {
    document.getElementById("choose-card").hidden = true;
    picker.addEventListener("change", () => picker.form.submit());
  }
  const form = document.getElementById("launch-form");
  if (!form) return;
  function showPickers() {
    const chosen = form.querySelector("input[name=selection]:checked");
    const value = chosen ? chosen.value : "all";
    document.getElementById("field-tags").hidden = value !== "tag";
    document.getElementById("field-cases").hidden = value !== "picked";
  }
  form.addEventListener("change", showPickers);
  showPickers();
})();
