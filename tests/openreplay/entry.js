// The unmodified npm releases, as a page would load them: one IIFE that sets
// window.OpenReplay = {Tracker (the class), tracker (the singleton), trackerAssist (the plugin)}.
import Tracker, { tracker } from "@openreplay/tracker";
import trackerAssist from "@openreplay/tracker-assist";

window.OpenReplay = { Tracker, tracker, trackerAssist };
