"""The two test tiers: which tests are ``slow`` (left out of ``make test-quick``, run by
``make test``), and the quick run's report of its long tests. conftest.py applies both.

A test is slow when
- it is marked ``@pytest.mark.slow`` by hand (an in-process training or an end-to-end run
  of more than QUICK_TEST_SECONDS), or
- it uses a fixture decorated with ``helpers.trains_in_subprocess``, or
- it starts subprocesses: the test function, or a function- or module-scoped fixture it
  uses, refers to the ``subprocess`` module, directly or through functions of the tests
  package (helpers.run_train_net, run_concurrently, convert_with_cli, a module's own
  runner, ...). A tool's subprocess pays seconds of imports (torch, detectron2) before
  it does anything. Session-scoped fixtures run once per session (per xdist worker) and
  are not counted (e.g. conftest.py's ``converted_reference``).
"""
import subprocess
import types

QUICK_TEST_SECONDS = 5  # a test left in the quick tier should take less (setup and call together)


def _code_calls_subprocess(code, namespace, seen):
    for name in code.co_names:
        value = namespace.get(name)
        if value is subprocess or getattr(value, "__module__", None) == "subprocess":
            return True
        if isinstance(value, types.FunctionType) and in_tests_package(value) and starts_subprocesses(value, seen):
            return True
    return any(_code_calls_subprocess(const, namespace, seen)
               for const in code.co_consts if isinstance(const, types.CodeType))


def in_tests_package(function):
    return (function.__module__ or "").split(".")[0] == "tests"


def starts_subprocesses(function, seen=None):
    """Whether ``function`` (of the tests package) refers to the subprocess module, itself,
    in a nested function or lambda, or through other functions of the tests package."""
    seen = set() if seen is None else seen
    if function in seen:
        return False
    seen.add(function)
    return _code_calls_subprocess(function.__code__, function.__globals__, seen)


def fixture_functions(item):
    """(scope, function) of every fixture ``item`` uses, directly or through other fixtures."""
    return [(definition.scope, definition.func)
            for definitions in item._fixtureinfo.name2fixturedefs.values() for definition in definitions]


def is_slow(item):
    """Whether the collected test ``item`` belongs to the full suite only (see the module doc)."""
    if item.get_closest_marker("slow"):
        return True
    fixtures = fixture_functions(item)
    if any(getattr(function, "trains_in_subprocess", False) for _, function in fixtures):
        return True
    functions = [item.function] + [function for scope, function in fixtures
                                   if scope != "session" and in_tests_package(function)]
    return any(starts_subprocesses(function) for function in functions)


class QuickTierReport:
    """In a run that deselects the slow tests: the tests that took longer than
    QUICK_TEST_SECONDS, listed at the end (to be marked slow or made cheaper)."""

    def __init__(self):
        self.seconds = {}

    def pytest_runtest_logreport(self, report):
        if report.when in ("setup", "call"):
            self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration

    def pytest_terminal_summary(self, terminalreporter):
        long = sorted(((seconds, nodeid) for nodeid, seconds in self.seconds.items()
                       if seconds > QUICK_TEST_SECONDS), reverse=True)
        if long:
            terminalreporter.section(f"tests over {QUICK_TEST_SECONDS} s in the quick tier: mark them slow "
                                     "or make them cheaper (docs/testing.md)")
            for seconds, nodeid in long:
                terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
