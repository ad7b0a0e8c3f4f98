"""Errors whose message says everything, reported as one line instead of a traceback.

``ONE_LINE_ERRORS`` is the one list of them: ``SetupError`` (a mistake in the config,
data, images or files; every specific kind derives from it) and ``NonFiniteValuesError``
(training diverged). tools/train_net.py ends the process with their message;
``install_one_line_errors`` makes detectron2's training loop log them as one line.
"""
import logging
import re

from detr_d2.errors import NonFiniteValuesError, SetupError

__all__ = ["ONE_LINE_ERRORS", "OneLineTrainingErrors", "install_one_line_errors", "user_error_message"]

ONE_LINE_ERRORS = (SetupError, NonFiniteValuesError)
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception): ")


def user_error_message(error):
    """The message of ``error`` for the user, without tracebacks.

    An error re-raised from a DataLoader worker carries the worker's traceback in its
    message: only the original message (its last line) is kept. FloatingPointErrors
    keep their type name in front.
    """
    text = str(error).strip()
    if "Original Traceback" in text:
        text = _EXCEPTION_LINE.sub("", text.splitlines()[-1])
    return f"FloatingPointError: {text}" if isinstance(error, FloatingPointError) else text


class OneLineTrainingErrors(logging.Filter):
    """Logs the errors of ONE_LINE_ERRORS that stop detectron2's training loop as one line.

    detectron2's ``TrainerBase.train`` logs every exception with its traceback ("Exception
    during training:"); for these errors the message says what happened and what to do.
    """

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ONE_LINE_ERRORS):
            record.msg, record.args = f"Training stopped: {user_error_message(error)}", ()
            record.exc_info, record.exc_text = None, None
        return True


def install_one_line_errors():
    """Add ``OneLineTrainingErrors`` to detectron2's training-loop logger (once)."""
    logger = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, OneLineTrainingErrors) for f in logger.filters):
        logger.addFilter(OneLineTrainingErrors())
