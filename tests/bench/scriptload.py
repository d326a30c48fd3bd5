"""Import a script of bench/ as a module (the scripts are not a package), for the tests of tests/bench."""
import importlib.util
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def load_script(name: str):
    """bench/<name>.py, freshly executed (its module-level state never leaks between tests)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
