"""The one error of the deployment package: a problem with what the user gave."""

__all__ = ["DeployError", "UnreadableImage"]


class DeployError(Exception):
    """A model folder, argument or file that cannot be used; the message names it and the fix."""


class UnreadableImage(DeployError):
    """An image file that cannot be decoded; the message is the reason."""
