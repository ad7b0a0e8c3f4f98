"""Access to datasets/prepare_shapes.py (a script, not a package) from the tests."""
import importlib.util
import sys

from tests.fixture_models import REPO


def load_prepare_shapes():
    """The datasets/prepare_shapes.py module (``generate_dataset`` and the presets)."""
    spec = importlib.util.spec_from_file_location("prepare_shapes", REPO / "datasets" / "prepare_shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
