"""pytest's setup for every test file: the programs under test see a user's environment.

A workspace may set PYTHONUNBUFFERED or PYTHONDONTWRITEBYTECODE; a user's machine does
not.  A test that waits for a line from a Python child passes only by luck where
PYTHONUNBUFFERED is set (Python block-buffers a pipe), so neither variable is passed on
to the processes the tests start: what passes here passes on a fresh machine.
"""

import os
import sys

for _variable in ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"):
    os.environ.pop(_variable, None)


def pytest_terminal_summary(terminalreporter):
    """Say why the real-3.6 test is missing where it is (pytest -q shows no header)."""
    test_spa = sys.modules.get("test_spa")          # only where test_spa.py was collected
    if test_spa is not None and not test_spa.PYTHONS36:
        terminalreporter.write_line(
            "python 3.6: none on this machine, so test_real_python36_end_to_end was not "
            "collected; test_runs_on_python36 still checks spa.py against 3.6 (with %s)"
            % ("vermin" if _importable("vermin") else "Python's own parser: vermin is missing"))


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None
