"""The ``ui`` fixture (a real ``mlflow ui`` on 127.0.0.1 over a fresh SQLite store) of
tests/tracking/test_ui_browser.py, for the atlas and report page browser tests: ``from mlflow_ui import ui``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_UI = Path(__file__).resolve().parents[1] / "tracking" / "test_ui_browser.py"
_spec = importlib.util.spec_from_file_location("analysis_ui_browser", _UI)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
ui = _module.ui

#: Chromium flags under which a sandboxed blob: iframe stays in the page's process (scriptable over CDP)
IFRAME_FLAGS = ["--disable-site-isolation-trials", "--disable-features=IsolateSandboxedIframes,IsolateOrigins"]
