/* hub tracker: reports this page as a live session to a hub (CONTRACT §2).
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
    reconnectMax: 10000       // keeps the expected retry well inside the hub's grace (30 s)
  };
  var INPUT_EVENTS = ["pointerdown", "keydown", "scroll", "touchstart", "mousemove", "wheel"];
  var current = null;
  // identify/setMetadata called before start(): applied when it runs.
  var early = {fields: {}, metadata: {}};

  function storageKey(projectKey) { return "hubTracker:" + projectKey; }
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
    try { this.ws.send(JSON.stringify(msg)); return true; } catch (e) { return false; }
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
        if (self.options.onStarted) self.options.onStarted(msg.sessionID, msg.session);
      } else if (msg.type === "error") {
        // The session was ended elsewhere (e.g. another tab's stop()): this
        // page is still live, so it starts a new one.
        if (msg.code === "not_started") {
          self.sessionID = null;
          self.sendStart();
        }
        if (self.options.onError) self.options.onError(msg);
      }
    };
    ws.onclose = function () {
      if (self.ws !== ws) return;
      self.open = false;
      self.ws = null;
      if (!self.stopped) self.retry();
    };
  };

  Tracker.prototype.sendStart = function () {
    var msg = {type: "start", active: this.isActive()};
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
  };

  Tracker.prototype.listen = function () {
    var self = this;
    this.onInput = function () {
      self.lastInput = Date.now();
      if (self.sentActive === false) self.activityChanged();
    };
    this.onVisibility = function () { self.activityChanged(); };
    this.onNavigate = function () { setTimeout(function () { self.checkPage(); }, 0); };
    for (var i = 0; i < INPUT_EVENTS.length; i++) {
      global.addEventListener(INPUT_EVENTS[i], this.onInput, {passive: true, capture: true});
    }
    document.addEventListener("visibilitychange", this.onVisibility);
    global.addEventListener("popstate", this.onNavigate);
    global.addEventListener("hashchange", this.onNavigate);
    patchHistory();
    navigationListeners.push(this.onNavigate);
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
    writeStored(this.key, null);
    if (this.ws) this.ws.close(1000, "ended");
    if (current === this) current = null;
  };

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
    get sessionID() { return current ? current.sessionID : null; }
  };
})(window);
