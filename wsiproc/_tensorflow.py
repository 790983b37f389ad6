"""TensorFlow starts quietly: its start-up lines never reach the user's terminal unless asked for.

TensorFlow 2.2x writes lines such as `oneDNN custom operations are on…` and absl's `All log messages before
absl::InitializeLog() is called are written to STDERR` from C++ while it is imported, before its logging is
set up, so `TF_CPP_MIN_LOG_LEVEL` does not reach them. This is the one place that configures TensorFlow's
start-up for the whole package: whichever import loads it first (`import tensorflow` in an engine,
`import keras` in training, a dask worker unpickling a task), `install()` has it load with file descriptor 2
pointed at a temporary file, sets `TF_CPP_MIN_LOG_LEVEL=2` and absl's Python logging to errors, and shows
what was held back only if the import fails. `WSIPROC_VERBOSE=1` (`wsiproc --verbose`) lets everything through.

A hook in `sys.meta_path` is a global choice, so the library leaves it to the program: the CLI installs it
(`wsiproc.cli.main`, and on the dask workers of its runs, `wsiproc.cohort.cluster`); `import wsiproc` does not.

Numerics are untouched: oneDNN stays as TensorFlow chooses (`TF_ENABLE_ONEDNN_OPTS` is not set).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys
from typing import Iterator
import tempfile

VERBOSE_ENV = "WSIPROC_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextlib.contextmanager
def stderr_held_back() -> Iterator[None]:
    """File descriptor 2 goes to a temporary file inside the block; its content is replayed only on an error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with stderr_held_back():
            self.loader.exec_module(module)
        with contextlib.suppress(ImportError):
            from absl import logging as absl_logging  # lazy: present only with TensorFlow

            absl_logging.set_verbosity(absl_logging.ERROR)


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` the usual way and wraps its loader; every other module passes by."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or verbose():
            return None
        sys.meta_path.remove(self)  # once: the real finders answer now, and later imports are TensorFlow's own
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Make the next import of TensorFlow quiet (nothing to do when it is loaded already)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _TensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TensorFlowFinder())
