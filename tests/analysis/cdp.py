"""A headless Chromium driven over the DevTools protocol (aiohttp's websocket client): open a page, evaluate
JavaScript, and record what a user would not want to see (console errors, uncaught exceptions, dialogs).

Used by the atlas browser tests and ``bench/atlas.py``; nothing here imports featstudy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """One Chromium with one tab. ``errors``: console errors and uncaught exceptions; ``dialogs``: alert/confirm
    messages (each dismissed); ``failed``: URLs whose loading failed."""

    def __init__(self, width: int = 1280, height: int = 900, extra_flags: list[str] | None = None):
        import aiohttp  # noqa: F401 - fail early when missing

        self.profile = Path(tempfile.mkdtemp(prefix="atlas-chromium-"))
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
                 f"--window-size={width},{height}", *(extra_flags or []), "about:blank"]
        self.proc = subprocess.Popen([CHROMIUM, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        for _ in range(100):
            tabs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5).read())
            pages = [t for t in tabs if t.get("type") == "page"]
            if pages:
                break
            time.sleep(0.1)
        self.ws_url = pages[0]["webSocketDebuggerUrl"]
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.failed: list[str] = []
        self._requests: dict[str, str] = {}
        self.loop = asyncio.new_event_loop()
        self._id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.loop.run_until_complete(self._connect())
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    async def _connect(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.ws_url, max_msg_size=0)
        self.reader = self.loop.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif method == "Page.javascriptDialogOpening":
                self.dialogs.append(params.get("message", ""))
                self.loop.create_task(self._call("Page.handleJavaScriptDialog", {"accept": False}))
            elif method == "Network.requestWillBeSent":
                self._requests[params["requestId"]] = params["request"]["url"]
            elif method == "Network.loadingFailed":
                self.failed.append(self._requests.get(params["requestId"], "?"))

    async def _call(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        fut = self.loop.create_future()
        self._pending[self._id] = fut
        await self.ws.send_str(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        return await asyncio.wait_for(fut, 120)

    def send(self, method: str, params: dict | None = None) -> dict:
        out = self.loop.run_until_complete(self._call(method, params))
        if "error" in out:
            raise RuntimeError(f"{method}: {out['error']}")
        return out.get("result", {})

    def eval(self, expression: str, context_id: int | None = None) -> Any:
        params = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context_id is not None:
            params["contextId"] = context_id
        res = self.send("Runtime.evaluate", params)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 30, context_id: int | None = None) -> Any:
        """Poll ``expression`` until truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.eval(expression, context_id)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(expression)
            self.loop.run_until_complete(asyncio.sleep(0.1))

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def open_mlflow_html_artifact(self, base: str, exp_id: str, run_id: str, path: str) -> int:
        """Open an HTML artifact in the MLflow UI's artifact view, check that the UI shows it from a ``blob:`` URL
        in an iframe, wait until the page inside has set ``data-ready``, and return the execution context (an
        isolated world of that frame) to evaluate in."""
        self.goto(f"{base}/#/experiments/{exp_id}/runs/{run_id}/artifacts/{path}")
        frame = self.wait("(() => { const f = document.querySelector('iframe.mlflow-html-iframe, iframe#html');"
                          " return f && f.src; })()", timeout=90)
        if not frame.startswith("blob:"):
            raise AssertionError(f"the MLflow UI showed {path} from {frame}, not a blob: URL")
        tree = self.send("Page.getFrameTree")["frameTree"]
        child = next(c["frame"]["id"] for c in tree.get("childFrames", []) if c["frame"]["url"].startswith("blob:"))
        world = self.send("Page.createIsolatedWorld", {"frameId": child})["executionContextId"]
        self.wait("document.body && document.body.dataset.ready === '1'", context_id=world)
        return world

    def route_timings(self, routes: list[tuple[str, str]]) -> dict[str, float]:
        """Seconds from setting each hash route to the page reporting it (``data-route``): ``{<kind>_view_s}``."""
        out = {}
        for hash_, kind in routes:
            t0 = time.perf_counter()
            self.eval(f"location.hash = {hash_!r}")
            self.wait(f"document.body.dataset.route === {kind!r}")
            out[f"{kind}_view_s"] = time.perf_counter() - t0
        return out

    def screenshot(self, path: Path) -> None:
        import base64

        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        try:
            if hasattr(self, "ws"):
                self.loop.run_until_complete(self.ws.close())
                self.loop.run_until_complete(self.session.close())
                self.reader.cancel()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
