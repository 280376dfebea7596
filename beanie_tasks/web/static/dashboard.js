// Live updates: the server's event stream says when something changed; without it, poll.
(function () {
  "use strict";
  var body = document.body;
  var dot = document.getElementById("live");
  if (body.dataset.live !== "on") { if (dot) { dot.className = "live off"; } return; }
  var refresh = function () { htmx.trigger(body, "bt-refresh"); };
  var poller = null;
  var poll = function () {
    if (poller === null) { poller = setInterval(refresh, 5000); }
    if (dot) { dot.className = "live poll"; dot.title = "live updates: polling"; }
  };
  if (!window.EventSource) { poll(); return; }
  var source = new EventSource(body.dataset.events);
  source.addEventListener("hello", function (event) {
    if (dot) { dot.className = "live " + event.data; dot.title = "live updates: " + event.data; }
  });
  source.addEventListener("refresh", refresh);
  source.onerror = function () { source.close(); poll(); };
  window.addEventListener("beforeunload", function () { source.close(); });
})();
