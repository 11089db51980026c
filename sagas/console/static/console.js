// Auto-refresh of pages that ask for it (data-refresh on <body>), which the checkbox turns off.
(function () {
  var seconds = parseInt(document.body.getAttribute("data-refresh") || "0", 10);
  var box = document.getElementById("auto-refresh");
  if (!seconds || !box) { return; }
  box.checked = window.localStorage.getItem("sagas-console-refresh") !== "off";
  box.addEventListener("change", function () {
    window.localStorage.setItem("sagas-console-refresh", box.checked ? "on" : "off");
  });
  window.setInterval(function () { if (box.checked) { window.location.reload(); } }, seconds * 1000);
})();
