"""A small ONNX model on the CPU: path checks and one lazily created session shared by all users.

Sessions are created on first use (off the event loop) because loading costs tens of milliseconds
and a server that never needs the model should not pay it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class OnnxModel:
    """Base for models run with onnxruntime; subclasses check the inputs in `_check`."""

    label = "ONNX model"

    def __init__(self, path: str | Path | None, default: Path | None, *, threads: int, missing_hint: str):
        resolved = Path(path) if path is not None else default
        if resolved is None:
            raise RuntimeError(f"{self.label} not found: {missing_hint}")
        if not resolved.is_file():
            raise FileNotFoundError(f"{self.label} not found at {resolved}")
        self.path = resolved
        self.threads = max(1, threads)
        self._session: Any = None
        self._load_lock = threading.Lock()

    def _check(self, session: Any) -> None:
        """Raise RuntimeError if the file is not the model this class expects."""

    def load(self) -> Any:
        """Create the session once (blocking; call off the event loop)."""
        if self._session is None:
            with self._load_lock:
                if self._session is None:
                    import onnxruntime as ort

                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = self.threads
                    opts.inter_op_num_threads = 1
                    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                    opts.log_severity_level = 3
                    session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                   providers=["CPUExecutionProvider"])
                    self._check(session)
                    self._session = session
                    logger.info("Loaded %s from %s", self.label, self.path)
        return self._session
