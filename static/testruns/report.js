// Report page: "Copy" puts a case's whole output on the clipboard (the text as shown, which
// the server escaped; textContent gives it back unescaped, as the model wrote it).
(function () {
  "use strict";
  document.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-copy]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copyFrom);
    if (!source) return;
    try {
      await navigator.clipboard.writeText(source.textContent);
      button.textContent = "Copied";
    } catch (_) {
      // No clipboard (an insecure origin): select the text so the user can copy it.
      const range = document.createRange();
      range.selectNodeContents(source);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = "Selected";
    }
    setTimeout(function () { button.textContent = "Copy"; }, 1500);
  });
})();
