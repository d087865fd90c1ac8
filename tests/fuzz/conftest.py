"""The fuzz suite's setup: Hypothesis keeps what it writes (its example database, cached constants)
out of the repository, in a temporary directory removed at exit."""

from __future__ import annotations

import atexit
import shutil
import tempfile

from hypothesis import configuration

_HOME = tempfile.mkdtemp(prefix="prime-hypothesis-")
configuration.set_hypothesis_home_dir(_HOME)
atexit.register(shutil.rmtree, _HOME, True)
