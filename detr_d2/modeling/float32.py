"""Parts of DETR that compute in float32 even when the model runs under ``torch.autocast``.

``float32_island(function)``: the function runs with autocast switched off for the device
of its tensors, and its floating-point tensor arguments (also inside lists, tuples, named
tuples and dicts, e.g. the targets or DINO's extra predictions) come in as float32.
Gradients flow back through the casts to the bfloat16/float16 predictions. Used for the
criterion and the Hungarian matcher (softmax probabilities, L1 and GIoU costs and losses:
near-equal matching costs must not be reordered by bfloat16's 8-bit mantissa, and loss
sums over hundreds of queries lose digits in 16 bits) and for the inference
post-processing (scores and boxes come out float32).
Without autocast (float32 models) it changes nothing.

``in_current_autocast(function)``: ``function`` wrapped to run under the autocast state of
the moment it was wrapped, e.g. the mask head that the criterion calls for the matched
queries only: it runs in the model's precision although the criterion is an island.
"""
import contextlib
import functools

import torch

__all__ = ["as_float32", "float32_island", "in_current_autocast"]

_DEVICE_TYPES = ("cpu", "cuda")


def as_float32(value):
    """``value`` with every 16-bit floating-point tensor in it (nested in lists, tuples,
    named tuples, dicts) as float32; anything else (float32/64, integer and bool tensors,
    functions, numbers) unchanged."""
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(as_float32(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(as_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: as_float32(item) for key, item in value.items()}
    return value


def _autocast_device_types():
    return [t for t in _DEVICE_TYPES if torch.is_autocast_enabled(t)]


def _autocast_off(device_types):
    stack = contextlib.ExitStack()
    for device_type in device_types:
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def float32_island(function):
    """Decorator: run ``function`` without autocast on float32 copies of its 16-bit tensor
    arguments (see module doc)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        device_types = _autocast_device_types()
        if not device_types:
            return function(*args, **kwargs)
        with _autocast_off(device_types):
            return function(*as_float32(args), **as_float32(kwargs))

    return wrapper


def in_current_autocast(function):
    """``function`` that, wherever it is called, runs under the autocast state (device types
    and dtypes) in force now; ``function`` itself when autocast is off."""
    states = [(t, torch.get_autocast_dtype(t)) for t in _autocast_device_types()]
    if not states:
        return function

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type, dtype in states:
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            return function(*args, **kwargs)

    return wrapper
