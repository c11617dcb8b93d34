"""pytest's setup for every test file: a user's environment, and spa.py's line coverage.

A workspace may set PYTHONUNBUFFERED or PYTHONDONTWRITEBYTECODE; a user's machine does
not.  A test that waits for a line from a Python child passes only by luck where
PYTHONUNBUFFERED is set (Python block-buffers a pipe), so neither variable is passed on
to the processes the tests start: what passes here passes on a fresh machine.

Coverage: in CI (CI=true), or with SPA_COVERAGE=yes, the lines of spa.py that the run
executes are counted, here and in every Python process the tests start (servers and
clients, many inside network namespaces), and the run ends with the total and the lines
that never ran.  A child measures itself through a sitecustomize module that this file
puts first on PYTHONPATH (coverage's own process_startup()).  What is not measured: the
packet reader, a fork of the server that its sandbox keeps from writing files (its code
is measured where tests run it in-process), and processes started without the
environment (`python3 -I`, the launcher `spa.py install` writes, a clean `env`).
"""

import os
import shutil
import sys
import tempfile
import textwrap

for _variable in ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"):
    os.environ.pop(_variable, None)

HERE = os.path.dirname(os.path.abspath(__file__))
SPA = os.path.join(HERE, "spa.py")

# The module a child imports at start (Python does so with any `sitecustomize` on its path):
# measure this process too, stop measuring in a fork that does not exec (the packet reader),
# then run the interpreter's own sitecustomize, which this one hides (Debian has one).
_SITECUSTOMIZE = '''\
import os, sys
try:
    import coverage
    coverage.process_startup()
    if hasattr(os, "register_at_fork"):
        import threading

        def _untraced():
            sys.settrace(None)
            threading.settrace(None)
        os.register_at_fork(after_in_child=_untraced)
except Exception:           # no coverage module for this Python (3.6, say): run unmeasured
    pass
_here = os.path.dirname(os.path.abspath(__file__))
try:
    import importlib.machinery, importlib.util
    _spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
except Exception:
    pass
'''

_RC = """\
[run]
data_file = {data}/.coverage
parallel = True
include = {spa}
disable_warnings = no-data-collected, module-not-imported, module-not-measured, module-not-python
"""


class _Coverage(object):
    """Coverage of spa.py over the whole run: started at once, reported at the end."""

    def __init__(self):
        import coverage
        self.dir = tempfile.mkdtemp(prefix="spa-coverage-")
        os.chmod(self.dir, 0o1777)      # a child that dropped root writes its data here too
        self.rc = os.path.join(self.dir, "coveragerc")
        with open(self.rc, "w") as f:
            f.write(_RC.format(data=self.dir, spa=SPA))
        with open(os.path.join(self.dir, "sitecustomize.py"), "w") as f:
            f.write(_SITECUSTOMIZE)
        self.environment = {"COVERAGE_PROCESS_START": self.rc,
                            "PYTHONPATH": os.pathsep.join(
                                [self.dir] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        os.environ.update(self.environment)
        self.cov = coverage.Coverage(config_file=self.rc)
        self.cov.start()
        if hasattr(os, "register_at_fork"):       # a test's own fork measures nothing
            import threading
            os.register_at_fork(after_in_child=lambda: (sys.settrace(None),
                                                        threading.settrace(None)))

    def report(self, write):
        """Combine every process's data; write the total and the lines never run."""
        self.cov.stop()
        self.cov.save()
        self.cov.combine([self.dir])
        _, statements, _, missing, ranges = self.cov.analysis2(SPA)
        write("coverage of spa.py: %.1f %% of %d statements (%d not run)"
              % (100.0 * (len(statements) - len(missing)) / max(1, len(statements)),
                 len(statements), len(missing)))
        for line in textwrap.wrap("lines not run: " + (ranges or "none"), 100,
                                  subsequent_indent="  "):
            write(line)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def without_coverage(env=None):
    """A child's environment with coverage off: for a test that looks at what a process
    loaded (coverage itself loads json, platform...)."""
    env = dict(os.environ if env is None else env)
    env.pop("COVERAGE_PROCESS_START", None)
    if COVERAGE is not None:
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != COVERAGE.dir]
        if rest:
            env["PYTHONPATH"] = os.pathsep.join(rest)
        else:
            env.pop("PYTHONPATH", None)
    return env


def _coverage_wanted():
    return os.environ.get("CI", "").lower() == "true" or \
        os.environ.get("SPA_COVERAGE", "").lower() in ("1", "yes", "true")


COVERAGE = None
COVERAGE_PROBLEM = None
if _coverage_wanted():
    try:
        COVERAGE = _Coverage()
    except ImportError:
        COVERAGE_PROBLEM = ("coverage: not measured: no coverage module for %s (setup.sh "
                            "installs it: Debian's python3-coverage, or pip)" % sys.executable)


def pytest_terminal_summary(terminalreporter):
    """Say why the real-3.6 test is missing where it is (pytest -q shows no header); print
    spa.py's coverage."""
    test_spa = sys.modules.get("test_spa")          # only where test_spa.py was collected
    if test_spa is not None and not test_spa.PYTHONS36:
        terminalreporter.write_line(
            "python 3.6: none on this machine, so test_real_python36_end_to_end was not "
            "collected; test_runs_on_python36 still checks spa.py against 3.6 (with %s)"
            % ("vermin" if _importable("vermin") else "Python's own parser: vermin is missing"))
    if COVERAGE is not None:
        COVERAGE.report(terminalreporter.write_line)
    elif COVERAGE_PROBLEM:
        terminalreporter.write_line(COVERAGE_PROBLEM)


def pytest_sessionfinish(session, exitstatus):
    """In CI a run without coverage fails, as a test it could have run would."""
    if COVERAGE_PROBLEM and os.environ.get("CI", "").lower() == "true" and exitstatus == 0:
        session.exitstatus = 1


def pytest_unconfigure(config):
    if COVERAGE is not None:
        COVERAGE.close()


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None
