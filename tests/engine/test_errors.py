"""detr_d2.errors: one exception type for user mistakes, caught the same way everywhere."""
import pytest

import detr_d2  # noqa: F401  (compat fixes before detectron2)
from detr_d2.checkpoint import CheckpointError, ConversionError
from detr_d2.data import DatasetError
from detr_d2.data.image_io import BadImageError, ImageNotFoundError
from detr_d2.engine.one_line_errors import ONE_LINE_ERRORS
from detr_d2.errors import NonFiniteValuesError, SetupError
from detr_d2.utils.tool_setup import EXIT_SETUP_ERROR, run_tool

SPECIFIC_ERRORS = [(DatasetError, ValueError), (BadImageError, OSError), (ImageNotFoundError, FileNotFoundError),
                   (CheckpointError, ValueError), (ConversionError, ValueError)]


@pytest.mark.parametrize("error_type, former_base", SPECIFIC_ERRORS)
def test_every_specific_user_error_is_a_setup_error_and_keeps_its_former_base(error_type, former_base):
    assert issubclass(error_type, SetupError) and issubclass(error_type, former_base)
    assert isinstance(error_type("the message"), ONE_LINE_ERRORS)


def test_divergence_is_a_floating_point_error_reported_in_one_line():
    assert issubclass(NonFiniteValuesError, FloatingPointError)
    assert not issubclass(NonFiniteValuesError, SetupError)
    assert NonFiniteValuesError in ONE_LINE_ERRORS


@pytest.mark.parametrize("error_type", [SetupError] + [error_type for error_type, _ in SPECIFIC_ERRORS])
def test_tools_report_any_user_error_as_one_line_with_the_setup_exit_status(error_type, capsys):
    def main(argv):
        raise error_type(f"{error_type.__name__}: what to fix")

    assert run_tool(main) == EXIT_SETUP_ERROR
    assert capsys.readouterr().err == f"ERROR: {error_type.__name__}: what to fix\n"
