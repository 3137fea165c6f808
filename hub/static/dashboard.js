/* Live sessions dashboard: one agent WebSocket (CONTRACT §3) feeding a
 * virtual table. Messages only change the model; one render per animation
 * frame touches the rows that are visible, so 5,000 sessions cost the same
 * to draw as 50. The same socket joins one session to watch it live (CONTRACT
 * §7). Session fields and relayed events are tracker-controlled: set as text only. */
(function () {
  "use strict";
  var ROW_H = 30, OVERSCAN = 6, STREAM_MAX = 200, TIMELINE_MAX = 500;
  var $ = function (id) { return document.getElementById(id); };
  var store = window.sessionStorage;

  var sessions = new Map();  // sessionID -> record, as the hub sent it
  var order = [];            // sessionIDs, newest session first (the API's default sort)
  var ws = null, attempt = 0, retryTimer = null, everOpened = false;
  var filters = [];
  var selected = null, stream = [], selectedEnd = null;
  var frame = 0, updates = 0;
  var pool = [];
  // The watched session: {id, state, cls, tabs, fresh (entries not drawn yet), events, dropped}.
  var watch = null;

  // --- model --------------------------------------------------------------

  function before(a, b) {  // sort: timestamp desc, ties by sessionID
    return a.timestamp !== b.timestamp ? a.timestamp > b.timestamp : a.sessionID < b.sessionID;
  }
  function insert(rec) {
    var lo = 0, hi = order.length;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      if (before(sessions.get(order[mid]), rec)) lo = mid + 1; else hi = mid;
    }
    order.splice(lo, 0, rec.sessionID);
  }
  function remove(id) {
    if (!sessions.delete(id)) return;
    var i = order.indexOf(id);
    if (i >= 0) order.splice(i, 1);
  }

  // activeTime moves with lastActiveAt while active, unless the update says it (README).
  function apply(rec, changes) {
    if ("lastActiveAt" in changes && !("activeTime" in changes) && rec.active) {
      rec.activeTime += Math.max(0, changes.lastActiveAt - rec.lastActiveAt);
    }
    Object.assign(rec, changes);
  }

  function onMessage(msg) {
    updates++;
    switch (msg.type) {
      case "snapshot":
        sessions = new Map();
        msg.sessions.forEach(function (s) { sessions.set(s.sessionID, s); });
        order = msg.sessions.map(function (s) { return s.sessionID; });
        order.sort(function (a, b) { return before(sessions.get(a), sessions.get(b)) ? -1 : 1; });
        if (selected && !sessions.has(selected)) selectedEnd = "not in this view";
        break;
      case "session.start":
        remove(msg.session.sessionID);
        sessions.set(msg.session.sessionID, msg.session);
        insert(msg.session);
        if (msg.session.sessionID === selected) { selectedEnd = null; logChange("start", msg.session); }
        break;
      case "session.update":
        var rec = sessions.get(msg.sessionID);
        if (!rec) break;
        var moved = "timestamp" in msg.changes && msg.changes.timestamp !== rec.timestamp;
        if (moved) remove(msg.sessionID);
        apply(rec, msg.changes);
        if (moved) { sessions.set(rec.sessionID, rec); insert(rec); }
        if (msg.sessionID === selected) logChange("update", msg.changes);
        break;
      case "sessions.update":  // lastActiveAt of many sessions in one frame
        for (var id in msg.changes) {
          var r = sessions.get(id);
          if (r) apply(r, msg.changes[id]);
        }
        break;
      case "session.end":
        remove(msg.sessionID);
        if (msg.sessionID === selected) { selectedEnd = msg.reason; logChange("end", {reason: msg.reason}); }
        if (watch && msg.sessionID === watch.id) {
          watchState("ended: " + msg.reason, "bad");
          note("session ended (" + msg.reason + ")");
        }
        break;
      case "joined":
        if (watch && msg.sessionID === watch.id) {
          watchState("watching", "ok");
          msg.tabs.forEach(function (t) { watch.tabs.add(t); });
          note("joined · " + msg.tabs.length + " tab" + (msg.tabs.length === 1 ? "" : "s"));
        }
        break;
      case "session.event":
        if (watch && msg.sessionID === watch.id) {
          watch.tabs.add(msg.tab);
          watch.events++;
          addEntry(msg.event === "error" ? "error" : "", msg.tab, msg.event, summarize(msg.event, msg.data),
                   msg.data);
        }
        break;
      case "session.gap":
        if (watch && msg.sessionID === watch.id) {
          watch.dropped += msg.dropped;
          addEntry("gap", "", "gap", msg.dropped + " events dropped: this view fell behind");
        }
        break;
      case "error":
        if (watch && msg.sessionID === watch.id) {
          watchState(msg.code === "not_found" ? "not live (not_found)" : "hub: " + (msg.message || msg.code), "bad");
        } else {
          setStatus("hub: " + (msg.message || msg.code), "bad");
        }
        break;
    }
    schedule();
  }

  // A relayed binary frame: a 2-byte length, a JSON header {sessionID, tab}, the payload.
  function onBinary(buffer) {
    if (!watch || buffer.byteLength < 2) return;
    var view = new DataView(buffer), len = view.getUint16(0);
    var head;
    try { head = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 2, len))); } catch (e) { return; }
    if (head.sessionID !== watch.id) return;
    watch.tabs.add(head.tab);
    watch.events++;
    addEntry("", head.tab, "binary", (buffer.byteLength - 2 - len) + " bytes");
    schedule();
  }

  function logChange(kind, data) {
    stream.unshift({at: Date.now(), kind: kind, data: data});
    if (stream.length > STREAM_MAX) stream.length = STREAM_MAX;
  }

  // --- connection -----------------------------------------------------------

  function connect() {
    var project = $("project").value.trim(), key = $("key").value;
    if (!project || !key) return;
    store.setItem("hubDashboard.project", project);
    store.setItem("hubDashboard.key", key);
    disconnect();
    if (attempt === 0) everOpened = false;  // a new project or key, not a retry
    var proto = location.protocol === "https:" ? "wss://" : "ws://";
    // Browsers cannot set headers on a WebSocket: the key goes as ?token=.
    var url = proto + location.host + "/ws/agent/" + encodeURIComponent(project) +
      "?token=" + encodeURIComponent(key);
    var sock = new WebSocket(url);
    sock.binaryType = "arraybuffer";
    ws = sock;
    setStatus("connecting…");
    sock.onopen = function () {
      attempt = 0;
      everOpened = true;
      setStatus("live", "ok");
      subscribe();
      if (watch) join();
    };
    sock.onmessage = function (event) {
      if (typeof event.data !== "string") { onBinary(event.data); return; }
      var msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      onMessage(msg);
    };
    sock.onclose = function (event) {
      if (ws !== sock) return;
      ws = null;
      if (watch) { watchState("disconnected: rejoins on reconnect", "bad"); schedule(); }
      var delay = Math.random() * Math.min(30000, 1000 * Math.pow(2, attempt++));
      var retrying = ", retrying in " + Math.ceil(delay / 1000) + " s";
      if (everOpened) {
        setStatus("disconnected (" + (event.code || "no code") + ")" + retrying, "bad");
      } else {
        // Never opened with this key and project: a refused handshake (401/404) is
        // indistinguishable from a dead hub here. Said until it opens, not only once.
        setStatus("could not connect: check the API key and project" + retrying, "bad");
      }
      retryTimer = setTimeout(connect, delay);
    };
  }

  function disconnect() {
    clearTimeout(retryTimer);
    if (ws) { var old = ws; ws = null; old.close(1000); }
  }

  function subscribe() {
    if (ws && ws.readyState === WebSocket.OPEN) {
      // batch: heartbeats of many sessions arrive as one sessions.update a second.
      var msg = {type: "subscribe", batch: true};
      if (filters.length) msg.filters = filters;
      ws.send(JSON.stringify(msg));
    }
  }

  function send(msg) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }

  function setStatus(text, cls) {
    var el = $("status");
    el.textContent = text;
    el.className = "status" + (cls ? " " + cls : "");
  }

  // --- rendering --------------------------------------------------------------

  function schedule() {
    if (!frame) frame = requestAnimationFrame(render);
  }

  function ago(ms) {
    var s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    return Math.floor(s / 3600) + " h ago";
  }
  function text(el, value) {  // writes only what changed: most frames change a cell or two
    if (el.textContent !== value) el.textContent = value;
  }
  function stateOf(s) { return !s.connected ? "reconnecting" : s.active ? "active" : "idle"; }

  function makeRow() {
    var row = document.createElement("div");
    row.className = "row";
    row.setAttribute("role", "row");
    ["who", "page", "country", "browser", "state", "ago", "tabs", "started"].forEach(function (c) {
      var cell = document.createElement("span");
      cell.className = c;
      cell.setAttribute("role", "cell");
      row.appendChild(cell);
    });
    return row;
  }

  function fill(row, s, index) {
    var c = row.children;
    row.style.transform = "translateY(" + index * ROW_H + "px)";
    if (row.dataset.sessionId !== s.sessionID) row.dataset.sessionId = s.sessionID;
    var cls = "row" + (s.sessionID === selected ? " selected" : "");
    if (row.className !== cls) row.className = cls;
    text(c[0], s.userID || s.userUUID || "anonymous · " + s.sessionID.slice(0, 8));
    c[0].title = s.sessionID;
    text(c[1], s.pageTitle || s.url || "");
    c[1].title = s.url || "";
    text(c[2], [s.userCountry, s.userCity].filter(Boolean).join(" · "));
    var browser = s.userBrowser ? s.userBrowser + " " + String(s.userBrowserVersion || "").split(".")[0] : "";
    text(c[3], [browser.trim(), s.userOs].filter(Boolean).join(" · "));
    var state = stateOf(s);
    text(c[4], state);
    if (c[4].className !== "state " + state) c[4].className = "state " + state;
    text(c[5], ago(s.lastActiveAt));
    text(c[6], String(s.tabs));
    text(c[7], ago(s.timestamp));
  }

  function render() {
    frame = 0;
    var viewport = $("viewport");
    $("spacer").style.height = order.length * ROW_H + "px";
    var first = Math.max(0, Math.floor(viewport.scrollTop / ROW_H) - OVERSCAN);
    var last = Math.min(order.length, Math.ceil((viewport.scrollTop + viewport.clientHeight) / ROW_H) + OVERSCAN);
    var rows = $("rows"), needed = Math.max(0, last - first);
    while (pool.length < needed) { var r = makeRow(); pool.push(r); rows.appendChild(r); }
    while (pool.length > needed) rows.removeChild(pool.pop());
    for (var i = 0; i < needed; i++) fill(pool[i], sessions.get(order[first + i]), first + i);
    document.title = "hub · " + order.length + " live";
    if (ws) setCount();
    renderDetail();
    renderWatch();
  }

  function setCount() {
    text($("status"), "live · " + order.length + " session" + (order.length === 1 ? "" : "s"));
  }

  var shownRecord = null;
  function renderDetail() {
    var aside = $("detail");
    if (!selected) { aside.hidden = true; return; }
    aside.hidden = false;
    var rec = sessions.get(selected);
    text($("detail-title"), rec ? (rec.userID || rec.userUUID || "anonymous") : selected);
    var st = $("detail-state");
    text(st, selectedEnd ? "ended: " + selectedEnd : rec ? stateOf(rec) + " · " + selected : "");
    st.className = selectedEnd ? "ended" : "";
    var json = rec ? JSON.stringify(rec, null, 2) : "";
    if (json !== shownRecord) { $("record").textContent = json; shownRecord = json; }
    var list = $("stream");
    if (list.childElementCount !== stream.length || (stream[0] && list.firstChild.dataset.at !== String(stream[0].at))) {
      list.textContent = "";
      stream.forEach(function (e) {
        var li = document.createElement("li");
        li.dataset.at = String(e.at);
        var t = document.createElement("time");
        t.textContent = new Date(e.at).toLocaleTimeString();
        li.appendChild(t);
        li.appendChild(document.createTextNode(e.kind + " " + JSON.stringify(e.data)));
        list.appendChild(li);
      });
    }
  }

  function select(id) {
    selected = id;
    stream = [];
    selectedEnd = null;
    shownRecord = null;
    schedule();
  }

  // --- watching one session (CONTRACT §7) ---------------------------------------

  function agentName() {
    return $("agent-name").value.trim() || "Support";
  }

  function join() {
    watchState("joining…");
    send({type: "join", sessionID: watch.id, agent: {name: agentName()}});
  }

  function openWatch(id) {
    if (watch) closeWatch();
    watch = {id: id, state: "", cls: "", tabs: new Set(), fresh: [], events: 0, dropped: 0, reset: true};
    $("watch").hidden = false;
    document.querySelector("main").classList.add("watching");
    if (ws && ws.readyState === WebSocket.OPEN) join();
    else watchState("waiting for the connection…");
    schedule();
  }

  function closeWatch() {
    if (!watch) return;
    send({type: "leave", sessionID: watch.id});
    watch = null;
    $("watch").hidden = true;
    document.querySelector("main").classList.remove("watching");
    schedule();
  }

  function watchState(text, cls) {
    watch.state = text;
    watch.cls = cls || "";
  }

  function clip(s, n) {
    s = String(s);
    return s.length > n ? s.slice(0, n - 1) + "…" : s;
  }

  function json(value) {
    try { return JSON.stringify(value); } catch (e) { return String(value); }
  }

  // One line for the timeline; tracker.js's own events get a readable one.
  function summarize(event, data) {
    if (data && typeof data === "object") {
      if (event === "navigate") return [data.title, data.url].filter(Boolean).join(" — ");
      if (event === "click") return (data.path || "") + (data.text ? " “" + data.text + "”" : "");
      if (event === "error") return (data.kind ? data.kind + ": " : "") + (data.message || "");
    }
    return json(data);
  }

  function addEntry(kind, tab, event, summary, data) {
    watch.fresh.push({at: Date.now(), kind: kind, tab: tab, event: event, summary: summary,
                      detail: data === undefined ? "" : json(data)});
    if (watch.fresh.length > TIMELINE_MAX) watch.fresh.splice(0, watch.fresh.length - TIMELINE_MAX);
  }

  function note(text) { addEntry("note", "", "·", text); }

  function cell(cls, value, el) {
    var c = document.createElement(el || "span");
    c.className = cls;
    c.textContent = value;
    return c;
  }

  var shownTabs = "";
  function renderWatch() {
    if (!watch) return;
    var rec = sessions.get(watch.id);
    text($("watch-title"), rec ? (rec.userID || rec.userUUID || "anonymous") + " · " + (rec.pageTitle || rec.url || "")
      : watch.id);
    var st = $("watch-state");
    text(st, watch.state + (watch.events ? " · " + watch.events + " events" : ""));
    st.className = watch.cls;
    var gap = $("watch-gap");
    gap.hidden = !watch.dropped;
    if (watch.dropped) {
      text(gap, watch.dropped + " events were dropped because this view fell behind; the timeline has a gap.");
    }
    var list = $("timeline");
    if (watch.reset) { list.textContent = ""; shownTabs = null; watch.reset = false; }
    if (watch.fresh.length) {
      // Newest first: the fresh entries, newest on top, go before the ones drawn.
      var batch = document.createDocumentFragment();
      for (var i = watch.fresh.length - 1; i >= 0; i--) {
        var e = watch.fresh[i], li = document.createElement("li");
        if (e.kind) li.className = e.kind;
        var t = cell("", new Date(e.at).toLocaleTimeString(), "time");
        li.appendChild(t);
        li.appendChild(cell("tab", e.tab.slice(0, 10)));
        li.lastChild.title = e.tab;
        li.appendChild(cell("event", clip(e.event, 64)));
        li.appendChild(cell("summary", clip(e.summary, 300)));
        if (e.detail) li.title = clip(e.detail, 2000);
        batch.appendChild(li);
      }
      watch.fresh = [];
      list.insertBefore(batch, list.firstChild);
      while (list.childElementCount > TIMELINE_MAX) list.removeChild(list.lastChild);
    }
    var tabs = Array.from(watch.tabs).sort();
    if (tabs.join(" ") !== shownTabs) {
      shownTabs = tabs.join(" ");
      $("watch-tabs").replaceChildren.apply($("watch-tabs"), tabs.map(function (id) { return cell("", id, "li"); }));
      var select = $("message-tab"), chosen = select.value;
      select.replaceChildren(new Option("every tab", ""));
      tabs.forEach(function (id) { select.add(new Option(id, id, false, id === chosen)); });
    }
  }

  function sendMessage() {
    var box = $("message-text"), words = box.value.trim(), tab = $("message-tab").value;
    if (!watch || !words) return;
    var msg = {type: "send", sessionID: watch.id, event: "message", data: {text: words}};
    if (tab) msg.tab = tab;
    if (!send(msg)) { watchState("not connected: message not sent", "bad"); schedule(); return; }
    box.value = "";
    addEntry("sent", tab, "you", "message: " + words);
    schedule();
  }

  // --- filters ----------------------------------------------------------------

  function addFilter(f) {
    f = f || {name: "", operator: "contains", value: []};
    var wrap = document.createElement("span");
    wrap.className = "filter";
    var name = document.createElement("input");
    name.className = "f-name"; name.placeholder = "name"; name.size = 12;
    name.setAttribute("list", "filter-names"); name.value = f.name;
    var op = document.createElement("select");
    op.className = "f-op";
    ["contains", "is"].forEach(function (o) { op.add(new Option(o, o, false, o === f.operator)); });
    var value = document.createElement("input");
    value.className = "f-value"; value.placeholder = "value, value…"; value.size = 14;
    value.value = (f.value || []).join(", ");
    var source = document.createElement("input");
    source.className = "f-source"; source.placeholder = "metadata key"; source.size = 10;
    source.value = f.source || "";
    source.hidden = f.name.toLowerCase() !== "metadata";
    name.addEventListener("input", function () { source.hidden = name.value.toLowerCase() !== "metadata"; });
    var del = document.createElement("button");
    del.type = "button"; del.textContent = "×"; del.setAttribute("aria-label", "remove filter");
    del.addEventListener("click", function () { wrap.remove(); });
    [name, source, op, value, del].forEach(function (el) { wrap.appendChild(el); });
    suggestValues(wrap, name, source, value);
    $("filter-rows").appendChild(wrap);
    return wrap;
  }

  // Suggestions as you type: field names from the page's datalist (and the
  // record's fields added below), values from the project's live sessions
  // (GET /public/{projectKey}/assist/autocomplete). The value box holds
  // comma-separated values: the last one is completed, the others kept.
  var EXTRA_NAMES = ["userBrowserVersion", "userDevice", "userDeviceType", "userState", "userAgent",
    "language", "appVersion", "trackerVersion", "referrer", "pageViews", "activeTime", "tabs"];
  var valueLists = 0;

  function addNames() {
    var list = $("filter-names");
    var known = new Set(Array.prototype.map.call(list.options, function (o) { return o.value; }));
    EXTRA_NAMES.forEach(function (n) { if (!known.has(n)) list.appendChild(new Option(n)); });
  }

  function suggestValues(wrap, name, source, value) {
    var list = document.createElement("datalist");
    list.id = "filter-values-" + (++valueLists);
    value.setAttribute("list", list.id);
    value.setAttribute("autocomplete", "off");
    wrap.appendChild(list);
    var timer = 0, asked = 0;
    function ask() {
      var project = $("project").value.trim(), key = $("key").value;
      var field = name.value.trim(), meta = field.toLowerCase() === "metadata";
      if (!project || !key || !field || (meta && !source.value.trim())) return;
      var parts = value.value.split(",");
      var q = parts.pop().trim();
      var kept = parts.map(function (v) { return v.trim(); }).filter(Boolean);
      var prefix = kept.length ? kept.join(", ") + ", " : "";
      var query = "?key=" + encodeURIComponent(field) + "&q=" + encodeURIComponent(q) +
        (meta ? "&source=" + encodeURIComponent(source.value.trim()) : "");
      var mine = ++asked;
      fetch("/public/" + encodeURIComponent(project) + "/assist/autocomplete" + query,
            {headers: {Authorization: "Bearer " + key}})
        .then(function (r) { return r.ok ? r.json() : {data: []}; })
        .then(function (answer) {
          if (mine !== asked) return;  // a later keystroke asked again
          list.replaceChildren.apply(list, answer.data.map(function (d) {
            var o = document.createElement("option");
            o.value = prefix + d.value;
            o.label = d.count + (d.count === 1 ? " session" : " sessions");
            return o;
          }));
        })
        .catch(function () { /* suggestions are a convenience: the filter still works */ });
    }
    function later() { clearTimeout(timer); timer = setTimeout(ask, 150); }
    value.addEventListener("input", later);
    value.addEventListener("focus", later);
    name.addEventListener("change", function () { list.replaceChildren(); });
  }

  function readFilters() {
    var out = [];
    document.querySelectorAll("#filter-rows .filter").forEach(function (w) {
      var name = w.querySelector(".f-name").value.trim();
      if (!name) return;
      var f = {
        name: name,
        operator: w.querySelector(".f-op").value,
        value: w.querySelector(".f-value").value.split(",").map(function (v) { return v.trim(); })
          .filter(Boolean)
      };
      var source = w.querySelector(".f-source").value.trim();
      if (name.toLowerCase() === "metadata" && source) f.source = source;
      out.push(f);
    });
    return out;
  }

  // --- wiring -------------------------------------------------------------------

  $("connect").addEventListener("submit", function (e) {
    e.preventDefault();
    attempt = 0;
    connect();
  });
  $("filters").addEventListener("submit", function (e) {
    e.preventDefault();
    filters = readFilters();
    store.setItem("hubDashboard.filters", JSON.stringify(filters));
    subscribe();
  });
  $("add-filter").addEventListener("click", function () { addFilter().querySelector("input").focus(); });
  $("viewport").addEventListener("scroll", schedule, {passive: true});
  window.addEventListener("resize", schedule);
  $("rows").addEventListener("click", function (e) {
    var row = e.target.closest(".row");
    if (row) select(row.dataset.sessionId);
  });
  $("close-detail").addEventListener("click", function () { select(null); });
  $("watch-open").addEventListener("click", function () { if (selected) openWatch(selected); });
  $("watch-back").addEventListener("click", closeWatch);
  $("message").addEventListener("submit", function (e) { e.preventDefault(); sendMessage(); });
  // Enter sends, Shift+Enter is a new line.
  $("message-text").addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendMessage(); }
  });
  // The name is what the session sees: joining again tells it the new one.
  $("agent-name").addEventListener("change", function () {
    store.setItem("hubDashboard.name", agentName());
    if (watch && ws && ws.readyState === WebSocket.OPEN) join();
  });
  // "n s ago" moves even when nothing arrives.
  setInterval(schedule, 1000);

  var params = new URLSearchParams(location.search);
  $("project").value = params.get("project") || store.getItem("hubDashboard.project") || "";
  $("key").value = store.getItem("hubDashboard.key") || "";
  $("agent-name").value = store.getItem("hubDashboard.name") || "Support";
  addNames();
  try { filters = JSON.parse(store.getItem("hubDashboard.filters") || "[]"); } catch (e) { filters = []; }
  filters.forEach(addFilter);
  if (!filters.length) addFilter();
  if ($("project").value && $("key").value) connect();

  // For tests and scripts: the model, not the DOM.
  window.hubDashboard = {
    count: function () { return order.length; },
    session: function (id) { return sessions.get(id) || null; },
    watching: function () {
      return watch && {sessionID: watch.id, state: watch.state, tabs: Array.from(watch.tabs), events: watch.events};
    },
    rowHeight: ROW_H
  };
})();
