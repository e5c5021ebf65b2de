"""llama-cpp-python's C API, loaded once with the backend initialised, and llama.cpp's log kept (not printed on
stderr) for the reason a load or a call fails (`_why`)."""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from typing import Any

from ..errors import LoramixError

_LOG: deque[str] = deque(maxlen=40)  # llama.cpp's last log lines: the reason a load fails
_INIT = threading.Lock()
_STATE: dict[str, Any] = {}


def _lib() -> Any:
    """llama_cpp's C API, with the backend initialised once and llama.cpp's log kept in _LOG instead of stderr."""
    with _INIT:
        if "lib" not in _STATE:
            try:
                import llama_cpp
            except ImportError:
                raise LoramixError("the llama.cpp runtime needs llama-cpp-python (make venv builds it; or "
                                   "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install llama-cpp-python)") from None

            @llama_cpp.llama_log_callback
            def keep(level: int, text: bytes, user_data: Any) -> None:
                _LOG.append(text.decode("utf-8", "replace").strip())

            llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _STATE["lib"], _STATE["log"] = llama_cpp, keep  # the callback must outlive every call
        return _STATE["lib"]


def _why() -> str:
    """The last error-looking line llama.cpp logged, for a refusal."""
    lines = [line for line in _LOG if line and ("error" in line.lower() or "failed" in line.lower())]
    return (lines or [line for line in _LOG if line] or ["no reason logged"])[-1][:200]
