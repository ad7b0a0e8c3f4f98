"""The learning-rate schedule of a pretraining run bounded by iterations and by time."""
import math


def run_progress(iteration, max_iter, elapsed_seconds, max_seconds):
    """Fraction of the run done: by iterations or by time, whichever is further along."""
    return max(iteration / max_iter, elapsed_seconds / max_seconds)


def learning_rate(base_lr, iteration, warmup_iters, progress):
    """Linear warm-up over ``warmup_iters``, then cosine from ``base_lr`` to 0 as
    ``progress`` (fraction of the run, by iterations or time) goes from 0 to 1."""
    warmup = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters > 0 else 1.0
    return base_lr * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
