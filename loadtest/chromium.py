"""How this project starts Debian's Chromium headless (browser tests and the dashboard bench).

The network flags keep Chromium from reaching for hosts this closed machine
cannot reach; each run also gets a fresh --user-data-dir from its caller.
"""

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
