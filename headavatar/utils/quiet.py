"""Silence third-party native log lines (MediaPipe / TensorFlow Lite / absl write to file
descriptor 2 from C++, e.g. "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.").

Python's own stderr (progress bars, our warnings and errors) keeps going to the terminal:
``sys.stderr`` is pointed at a duplicate of the original descriptor while descriptor 2
itself goes to a temporary file.  If the block fails with a bug (not a UserError), what the
libraries said is replayed, since it may explain the failure.  ``--verbose`` turns this off.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator

from headavatar.errors import UserError

# read by MediaPipe's glog / absl and TensorFlow at import: only errors
_ENV = {"GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2", "ABSL_MIN_LOG_LEVEL": "2"}


@contextmanager
def quiet_native_logs(enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    try:
        sys.stderr.flush()
        fd2 = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured by a test runner)
        yield
        return
    saved = os.dup(fd2)
    old_stderr = sys.stderr
    sink = tempfile.TemporaryFile(mode="w+b")
    py_err = os.fdopen(os.dup(saved), "w", buffering=1, encoding=getattr(old_stderr, "encoding", None) or "utf-8", errors="replace")
    os.dup2(sink.fileno(), fd2)
    sys.stderr = py_err
    failed = False
    try:
        yield
    except UserError:
        raise  # a one-line message the user can act on: no noise after it
    except Exception:
        failed = True  # a bug: what the libraries said may explain it
        raise
    finally:
        py_err.flush()
        os.dup2(saved, fd2)
        os.close(saved)
        sys.stderr = old_stderr
        py_err.close()
        if failed:
            sink.seek(0)
            noise = sink.read().decode("utf-8", "replace").strip()
            if noise:
                print("(native library output, shown because the command failed:)\n" + noise[-4000:], file=sys.stderr)
        sink.close()
