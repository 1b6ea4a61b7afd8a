"""``musar ui``: a Gradio web app for multi-subject generation (needs the ``ui`` extra).

Importing this package switches Gradio's telemetry and update check off before Gradio is loaded:
the app must start, and stay quiet, on a machine with no network.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
