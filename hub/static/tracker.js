/* hub tracker: reports this page as a live session to a hub (CONTRACT §2) and,
 * while agents watch it, streams what happens in it to them (CONTRACT §7).
 * No build step, no dependencies. Usage:
 *   HubTracker.start({url: "wss://hub.example.com", projectKey: "shop", userID: "ann@example.com"});
 */
(function (global) {
  "use strict";
  var VERSION = "1.0.0";
  var DEFAULTS = {
    heartbeatInterval: 15000, // well under the hub's heartbeat timeout (60 s)
    idleAfter: 300000,        // no input for this long: active=false even when visible
    reconnectBase: 1000,      // backoff: random(0, min(max, base * 2^attempt))
    reconnectMax: 10000,      // keeps the expected retry well inside the hub's grace (30 s)
    // The hub closes a tab past its message rate (--rate-limit, 100/s), frame size
    // (--max-frame) or relay limits: stay well under each.
    relayEvents: 20,          // events streamed per second at most; the rest wait, then drop
    relayBytes: 32768,        // bytes streamed per second at most
    relayMaxEvent: 8192,      // bytes of one event frame; a bigger emit() is refused
    showMessages: true        // an agent's "message" event shows as a notice in the page
  };
  var INPUT_EVENTS = ["pointerdown", "keydown", "scroll", "touchstart", "mousemove", "wheel"];
  var OUTBOX_MAX = 100;       // events waiting for the rate budget; more are counted as dropped
  // A click on (or in) these reports no text: it could be what the user typed.
  var EDITABLE = "input,textarea,select,[contenteditable]:not([contenteditable=false]),[data-hub-private]";
  var TARGETS = "a,button,label,summary,select,input,textarea,[role=button],[role=link],[role=tab],[role=menuitem]";
  var current = null;
  // identify/setMetadata called before start(): applied when it runs.
  var early = {fields: {}, metadata: {}};

  function storageKey(projectKey) { return "hubTracker:" + projectKey; }
  function newTabID() {
    var bytes = new Uint8Array(8), out = "", i;
    if (global.crypto && crypto.getRandomValues) crypto.getRandomValues(bytes);
    else for (i = 0; i < 8; i++) bytes[i] = Math.random() * 256;
    for (i = 0; i < 8; i++) out += (bytes[i] + 256).toString(16).slice(1);
    return out;
  }
  function readStored(key) {
    try { return global.sessionStorage.getItem(key); } catch (e) { return null; }
  }
  function writeStored(key, value) {
    try {
      if (value == null) global.sessionStorage.removeItem(key);
      else global.sessionStorage.setItem(key, value);
    } catch (e) { /* storage disabled: the session just won't survive a reload */ }
  }

  function wsURL(base, projectKey) {
    var url = String(base).replace(/\/+$/, "").replace(/^http(s?):/, "ws$1:");
    return url + "/ws/tracker/" + encodeURIComponent(projectKey);
  }

  function describeClient() {
    var ua = navigator.userAgent || "";
    var os = /Windows/.test(ua) ? "Windows" : /Android/.test(ua) ? "Android" :
      /iPhone|iPad|iPod/.test(ua) ? "iOS" : /Mac OS X/.test(ua) ? "macOS" :
      /CrOS/.test(ua) ? "Chrome OS" : /Linux/.test(ua) ? "Linux" : null;
    // Order matters: Edge and Opera also say Chrome, Chrome also says Safari.
    var browsers = [["Edge", /Edg\/([\d.]+)/], ["Opera", /OPR\/([\d.]+)/], ["Firefox", /Firefox\/([\d.]+)/],
      ["Chrome", /(?:Headless)?Chrome\/([\d.]+)/], ["Safari", /Version\/([\d.]+).*Safari/]];
    var browser = null, version = null;
    for (var i = 0; i < browsers.length; i++) {
      var m = browsers[i][1].exec(ua);
      if (m) { browser = browsers[i][0]; version = m[1]; break; }
    }
    var shortSide = Math.min(screen.width || 0, screen.height || 0);
    var touch = (navigator.maxTouchPoints || 0) > 0;
    var device = /iPad|Tablet/.test(ua) || (/Android/.test(ua) && !/Mobile/.test(ua)) ? "tablet" :
      /Mobi|iPhone|iPod/.test(ua) || (touch && shortSide > 0 && shortSide < 600) ? "mobile" : "desktop";
    return {
      userAgent: ua, userOs: os, userBrowser: browser, userBrowserVersion: version,
      userDeviceType: device, language: navigator.language || null, trackerVersion: VERSION
    };
  }

  function Tracker(options) {
    if (!options || !options.url || !options.projectKey) {
      throw new Error("HubTracker.start needs {url, projectKey}");
    }
    var o = {};
    for (var k in DEFAULTS) o[k] = DEFAULTS[k];
    for (k in options) o[k] = options[k];
    this.options = o;
    this.key = storageKey(o.projectKey);
    this.sessionID = o.sessionID || readStored(this.key) || null;
    // sessionStorage is per browser tab: a reload keeps the tab's id. A duplicated
    // tab copies it; the hub then names it anew in `started`.
    this.tabKey = this.key + ":tab";
    this.tabID = readStored(this.tabKey) || newTabID();
    // Everything the hub should hold; a (re)connect sends all of it in `start`,
    // which the hub merges into a live session of the same sessionID.
    this.fields = describeClient();
    var pass = ["userID", "userUUID", "environment", "appVersion", "userCountry", "userState", "userCity"];
    for (var i = 0; i < pass.length; i++) if (o[pass[i]] != null) this.fields[pass[i]] = String(o[pass[i]]);
    for (k in early.fields) this.fields[k] = early.fields[k];
    this.metadata = {};
    for (k in o.metadata || {}) this.metadata[k] = String(o.metadata[k]);
    for (k in early.metadata) this.metadata[k] = early.metadata[k];
    early = {fields: {}, metadata: {}};
    this.userProperties = o.userProperties || null;
    this.page = this.readPage(document.referrer || null);
    this.lastInput = Date.now();
    this.sentActive = null;
    this.ws = null;
    this.open = false;     // `start` sent on the current socket
    this.stopped = false;
    this.attempt = 0;
    this.retryTimer = null;
    // The live relay: who watches, and what waits for the rate budget.
    this.watchers = [];
    this.outbox = [];
    this.dropped = 0;
    this.budget = {start: 0, events: 0, bytes: 0};
    this.flushTimer = null;
    this.listen();
    this.connect();
    var self = this;
    this.beat = setInterval(function () { self.tick(); }, o.heartbeatInterval);
  }

  Tracker.prototype.readPage = function (referrer) {
    return {url: location.href, pageTitle: document.title || null, referrer: referrer};
  };

  Tracker.prototype.isActive = function () {
    return document.visibilityState !== "hidden" && Date.now() - this.lastInput < this.options.idleAfter;
  };

  Tracker.prototype.send = function (msg) {
    if (!this.open) return false;
    try { this.ws.send(typeof msg === "string" ? msg : JSON.stringify(msg)); return true; }
    catch (e) { return false; }
  };

  Tracker.prototype.connect = function () {
    var self = this;
    this.retryTimer = null;
    var ws;
    try { ws = new WebSocket(wsURL(this.options.url, this.options.projectKey)); }
    catch (e) { this.retry(); return; }
    this.ws = ws;
    ws.onopen = function () {
      self.open = true;
      self.sendStart();
    };
    ws.onmessage = function (event) {
      var msg;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      if (msg.type === "started") {
        self.attempt = 0;
        self.sessionID = msg.sessionID;
        writeStored(self.key, msg.sessionID);
        if (msg.tabId) { self.tabID = msg.tabId; writeStored(self.tabKey, msg.tabId); }
        if (self.options.onStarted) self.options.onStarted(msg.sessionID, msg.session);
      } else if (msg.type === "error") {
        // The session was ended elsewhere (e.g. another tab's stop()): this
        // page is still live, so it starts a new one.
        if (msg.code === "not_started") {
          self.sessionID = null;
          self.sendStart();
        }
        if (self.options.onError) self.options.onError(msg);
      } else if (msg.type === "agents") {
        self.setWatchers(msg.count > 0 && msg.agents ? msg.agents : []);
      } else if (msg.type === "agent.event") {
        self.agentEvent(msg);
      }
    };
    ws.onclose = function () {
      if (self.ws !== ws) return;
      self.open = false;
      self.ws = null;
      // Nobody watches through a closed socket; the next `started` comes with
      // `agents` again if they are still joined.
      self.setWatchers([]);
      if (!self.stopped) self.retry();
    };
  };

  Tracker.prototype.sendStart = function () {
    var msg = {type: "start", active: this.isActive(), tabId: this.tabID};
    if (this.sessionID) msg.sessionID = this.sessionID;
    for (var k in this.fields) msg[k] = this.fields[k];
    for (k in this.page) msg[k] = this.page[k];
    msg.metadata = this.metadata;
    if (this.userProperties) msg.userProperties = this.userProperties;
    this.sentActive = msg.active;
    this.send(msg);
  };

  // Exponential backoff with full jitter: after a hub drains, its trackers
  // spread their reconnects over the whole window instead of all at once.
  Tracker.prototype.retry = function () {
    if (this.stopped || this.retryTimer) return;
    var cap = Math.min(this.options.reconnectMax, this.options.reconnectBase * Math.pow(2, this.attempt));
    this.attempt++;
    var self = this;
    this.retryTimer = setTimeout(function () { self.connect(); }, Math.random() * cap);
  };

  Tracker.prototype.tick = function () {
    this.checkPage();
    var active = this.isActive();
    this.sentActive = active;
    this.send({type: "heartbeat", active: active});
  };

  // A change of visibility or the first input after idling is reported at once.
  Tracker.prototype.activityChanged = function () {
    if (this.isActive() !== this.sentActive) this.tick();
  };

  // SPA navigation: the url (and usually the title, set just after) changed.
  Tracker.prototype.checkPage = function () {
    if (location.href === this.page.url && (document.title || null) === this.page.pageTitle) return;
    var previous = this.page.url;
    var page = this.readPage(location.href !== previous ? previous : this.page.referrer);
    this.page = page;
    this.send({type: "update", url: page.url, pageTitle: page.pageTitle, referrer: page.referrer});
    this.emit("navigate", {url: page.url, title: page.pageTitle});
  };

  Tracker.prototype.listen = function () {
    var self = this;
    this.onInput = function () {
      self.lastInput = Date.now();
      if (self.sentActive === false) self.activityChanged();
    };
    this.onVisibility = function () { self.activityChanged(); };
    this.onNavigate = function () { setTimeout(function () { self.checkPage(); }, 0); };
    this.onClick = function (e) { if (self.watchers.length) self.click(e.target); };
    this.onError = function (e) {
      if (self.watchers.length && e.message) {
        self.error("uncaught", e.message, e.filename ? e.filename + ":" + e.lineno : null);
      }
    };
    this.onRejection = function (e) { if (self.watchers.length) self.error("rejection", describe(e.reason)); };
    this.onConsole = function (args) {
      if (self.watchers.length) self.error("console", Array.prototype.map.call(args, describe).join(" "));
    };
    for (var i = 0; i < INPUT_EVENTS.length; i++) {
      global.addEventListener(INPUT_EVENTS[i], this.onInput, {passive: true, capture: true});
    }
    document.addEventListener("visibilitychange", this.onVisibility);
    global.addEventListener("popstate", this.onNavigate);
    global.addEventListener("hashchange", this.onNavigate);
    patchHistory();
    navigationListeners.push(this.onNavigate);
    document.addEventListener("click", this.onClick, {capture: true, passive: true});
    global.addEventListener("error", this.onError);
    global.addEventListener("unhandledrejection", this.onRejection);
    patchConsole();
    consoleListeners.push(this.onConsole);
  };

  Tracker.prototype.identify = function (userID) {
    this.fields.userID = userID == null ? null : String(userID);
    this.send({type: "update", userID: this.fields.userID});
  };

  // A null value removes the key.
  Tracker.prototype.setMetadata = function (key, value) {
    var change = {};
    change[key] = value == null ? null : String(value);
    if (value == null) delete this.metadata[key];
    else this.metadata[key] = change[key];
    this.send({type: "update", metadata: change});
  };

  // Ends the session on the hub; a later start() begins a new one.
  Tracker.prototype.stop = function () {
    if (this.stopped) return;
    this.send({type: "end"});
    this.stopped = true;
    clearInterval(this.beat);
    clearTimeout(this.retryTimer);
    for (var i = 0; i < INPUT_EVENTS.length; i++) {
      global.removeEventListener(INPUT_EVENTS[i], this.onInput, {capture: true});
    }
    document.removeEventListener("visibilitychange", this.onVisibility);
    global.removeEventListener("popstate", this.onNavigate);
    global.removeEventListener("hashchange", this.onNavigate);
    navigationListeners.splice(navigationListeners.indexOf(this.onNavigate), 1);
    document.removeEventListener("click", this.onClick, {capture: true});
    global.removeEventListener("error", this.onError);
    global.removeEventListener("unhandledrejection", this.onRejection);
    consoleListeners.splice(consoleListeners.indexOf(this.onConsole), 1);
    clearTimeout(this.flushTimer);
    writeStored(this.key, null);
    if (this.ws) this.ws.close(1000, "ended");
    if (current === this) current = null;
  };

  // --- live relay (CONTRACT §7) ------------------------------------------------

  var agentEventListeners = [];
  var watcherListeners = [];

  function notify(listeners, args) {
    for (var i = 0; i < listeners.length; i++) {
      // A listener's exception is reported, not allowed to stop the tracker or the others.
      try { listeners[i].apply(null, args); }
      catch (e) { setTimeout(function () { throw e; }, 0); }
    }
  }

  function listen(listeners, fn) {
    listeners.push(fn);
    return function () {
      var i = listeners.indexOf(fn);
      if (i >= 0) listeners.splice(i, 1);
    };
  }

  Tracker.prototype.setWatchers = function (agents) {
    var was = this.watchers.length > 0;
    this.watchers = agents;
    if (!agents.length) {
      this.outbox = [];
      this.dropped = 0;
      clearTimeout(this.flushTimer);
      this.flushTimer = null;
    } else if (!was) {
      // The agents' timeline starts with where the page is.
      this.emit("navigate", {url: this.page.url, title: this.page.pageTitle});
    }
    if (agents.length || was) notify(watcherListeners, [agents.slice()]);
  };

  Tracker.prototype.agentEvent = function (msg) {
    var from = {id: msg.agent, agent: {}};
    for (var i = 0; i < this.watchers.length; i++) {
      if (this.watchers[i].id === msg.agent) from = this.watchers[i];
    }
    var data = msg.data;
    if (msg.event === "message" && this.options.showMessages && data && typeof data.text === "string") {
      showNotice(clip(data.text, 1000), from.agent && typeof from.agent.name === "string" ? from.agent.name : "");
    }
    notify(agentEventListeners, [msg.event, data, from]);
  };

  // Streams an event to the agents watching. False when nobody watches, the
  // event is too big, or the waiting room is full (then counted as dropped).
  Tracker.prototype.emit = function (event, data) {
    if (!this.watchers.length || !this.open) return false;
    event = String(event);
    var body;
    try { body = JSON.stringify(data === undefined ? null : data); } catch (e) { return false; }
    if (!event || event.length > 64 || body === undefined) return false;
    var head = '{"type":"emit","event":' + JSON.stringify(event) + ',"data":';
    if (byteLength(head + body) + 24 > this.options.relayMaxEvent) return false;  // 24: room for "repeat"
    var last = this.outbox[this.outbox.length - 1];
    // A burst of the same event (an error in a loop) waiting for the budget is sent once.
    if (last && last.head === head && last.body === body) { last.repeat++; return true; }
    if (this.outbox.length >= OUTBOX_MAX) { this.dropped++; return false; }
    this.outbox.push({head: head, body: body, repeat: 1});
    this.flush();
    return true;
  };

  // Sends what the budget of the current second allows; the rest waits for the next.
  Tracker.prototype.flush = function () {
    var o = this.options, b = this.budget, now = Date.now(), self = this;
    if (now - b.start >= 1000) { b.start = now; b.events = 0; b.bytes = 0; }
    while (this.outbox.length && b.events < o.relayEvents) {
      var item = this.outbox[0], body = item.body;
      if (item.repeat > 1 && body.charAt(0) === "{") {
        body = '{"repeat":' + item.repeat + (body === "{}" ? "}" : "," + body.slice(1));
      }
      var frame = item.head + body + "}", size = byteLength(frame);
      if (b.events && b.bytes + size > o.relayBytes) break;
      this.outbox.shift();
      b.events++;
      b.bytes += size;
      this.send(frame);
      if (!this.outbox.length && this.dropped) {
        this.outbox.push({head: '{"type":"emit","event":"dropped","data":', body: '{"count":' + this.dropped + "}", repeat: 1});
        this.dropped = 0;
      }
    }
    if (this.outbox.length && !this.flushTimer) {
      this.flushTimer = setTimeout(function () { self.flushTimer = null; self.flush(); }, b.start + 1000 - now);
    }
  };

  Tracker.prototype.click = function (target) {
    if (!target || target.nodeType !== 1 || target === noticeHost) return;
    var el = target.closest(TARGETS) || target;
    this.emit("click", {path: elementPath(el), text: visibleText(el)});
  };

  Tracker.prototype.error = function (kind, message, source) {
    var data = {kind: kind, message: clip(message, 300)};
    if (source) data.source = clip(source, 200);
    this.emit("error", data);
  };

  // "main > ul.items > li > a#checkout": at most 5 steps, up to the nearest id.
  function elementPath(el) {
    var parts = [];
    for (var depth = 0; el && el.nodeType === 1 && depth < 5; depth++, el = el.parentElement) {
      var part = el.localName;
      if (el.id) { parts.unshift(part + "#" + clip(el.id, 40)); break; }
      // An SVG element's className is not a string.
      var classes = typeof el.className === "string" ? el.className.trim().split(/\s+/).slice(0, 2) : [];
      if (classes[0]) part += "." + classes.map(function (c) { return clip(c, 30); }).join(".");
      parts.unshift(part);
      if (part === "body") break;
    }
    return parts.join(" > ");
  }

  // The element's text as the user sees it, trimmed; none for anything the user
  // may have typed into (or that the page marks data-hub-private).
  function visibleText(el) {
    if (el.isContentEditable || el.closest(EDITABLE) || el.querySelector(EDITABLE)) return "";
    var text = el.textContent || "";
    // innerText needs layout: only for a small element, not a whole page.
    if (text.length < 2000) text = el.innerText || text;
    return clip(text.replace(/\s+/g, " ").trim(), 60);
  }

  function describe(value) {
    if (value instanceof Error) return value.name + ": " + value.message;
    if (typeof value === "string") return value;
    try { return JSON.stringify(value) || String(value); } catch (e) { return String(value); }
  }

  function clip(s, n) {
    s = String(s);
    return s.length > n ? s.slice(0, n - 1) + "…" : s;
  }

  function byteLength(s) {  // UTF-8; a surrogate pair counts 2 + 2
    var n = s.length;
    for (var i = 0; i < s.length; i++) {
      var c = s.charCodeAt(i);
      if (c > 0x7f) n += c > 0x7ff && (c < 0xd800 || c > 0xdfff) ? 2 : 1;
    }
    return n;
  }

  // An agent's message: a small notice in a shadow root (the page's CSS cannot
  // reach it), text only, styled through the CSSOM (allowed by a strict CSP).
  var noticeHost = null, noticeList = null;
  function css(el, styles) { for (var k in styles) el.style[k] = styles[k]; }
  function showNotice(text, from) {
    if (!document.body) return;
    if (!noticeHost || !noticeHost.isConnected) {
      noticeHost = document.createElement("div");
      noticeHost.id = "hub-tracker-notices";
      noticeList = document.createElement("div");
      css(noticeList, {position: "fixed", right: "16px", bottom: "16px", zIndex: "2147483647", display: "flex",
        flexDirection: "column", gap: "8px", width: "min(360px, calc(100vw - 32px))",
        font: "14px/1.4 system-ui, sans-serif", color: "#1f2328"});
      (noticeHost.attachShadow ? noticeHost.attachShadow({mode: "open"}) : noticeHost).appendChild(noticeList);
      document.body.appendChild(noticeHost);
    }
    var box = document.createElement("div");
    box.setAttribute("role", "status");
    css(box, {background: "#fff", border: "1px solid #d0d7de", borderRadius: "6px", padding: "10px 32px 10px 12px",
      boxShadow: "0 4px 12px rgba(0,0,0,.15)", position: "relative", whiteSpace: "pre-wrap", overflowWrap: "anywhere"});
    var title = document.createElement("strong");
    title.textContent = from ? "Message from " + clip(from, 60) : "Message from support";
    css(title, {display: "block", marginBottom: "2px"});
    var body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    var close = document.createElement("button");
    close.type = "button";
    close.textContent = "×";
    close.setAttribute("aria-label", "Dismiss");
    css(close, {position: "absolute", top: "2px", right: "6px", border: "0", background: "none", color: "inherit",
      font: "20px/1 system-ui, sans-serif", cursor: "pointer", padding: "4px"});
    close.addEventListener("click", function () { box.remove(); });
    box.appendChild(title);
    box.appendChild(body);
    box.appendChild(close);
    noticeList.appendChild(box);
    while (noticeList.childElementCount > 3) noticeList.removeChild(noticeList.firstChild);
  }

  // console.error is wrapped once; each tracker listens while it runs.
  var consoleListeners = [];
  var consolePatched = false;
  function patchConsole() {
    if (consolePatched || !global.console) return;
    consolePatched = true;
    var original = console.error;
    console.error = function () {
      for (var i = 0; i < consoleListeners.length; i++) consoleListeners[i](arguments);
      return original.apply(this, arguments);
    };
  }

  // pushState/replaceState fire no event: wrap them once.
  var navigationListeners = [];
  var patched = false;
  function patchHistory() {
    if (patched) return;
    patched = true;
    ["pushState", "replaceState"].forEach(function (name) {
      var original = history[name];
      history[name] = function () {
        var result = original.apply(this, arguments);
        for (var i = 0; i < navigationListeners.length; i++) navigationListeners[i]();
        return result;
      };
    });
  }

  global.HubTracker = {
    version: VERSION,
    // One tracker per page: a second start() stops the first.
    start: function (options) {
      if (current) current.stop();
      current = new Tracker(options);
      return current;
    },
    stop: function () { if (current) current.stop(); },
    identify: function (userID) {
      if (current) current.identify(userID);
      else early.fields.userID = userID == null ? null : String(userID);
    },
    setMetadata: function (key, value) {
      if (current) current.setMetadata(key, value);
      else if (value == null) delete early.metadata[key];
      else early.metadata[key] = String(value);
    },
    // The live relay: emit() streams an event to the watching agents (false when
    // none watch); the on…() calls return a function that removes the listener.
    emit: function (event, data) { return current ? current.emit(event, data) : false; },
    agents: function () { return current ? current.watchers.slice() : []; },
    onAgents: function (fn) { return listen(watcherListeners, fn); },
    onAgentEvent: function (fn) { return listen(agentEventListeners, fn); },
    get sessionID() { return current ? current.sessionID : null; },
    get tabID() { return current ? current.tabID : null; }
  };
})(window);
