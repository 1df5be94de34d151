"""The trainer's exceptions: one base, specific subclasses, messages that say how to fix the cause."""


class TrainerError(Exception):
    """Base of every error the trainer raises on purpose. The CLI prints its message and exits non-zero."""


class ConfigError(TrainerError):
    """A flag or environment variable is missing or malformed. The message names it; the CLI exits 2."""


class CheckpointError(TrainerError):
    """The work directory holds no usable checkpoint, or one made for another model."""


class DataError(TrainerError):
    """The requested split holds too few samples, or an input image cannot be used."""


class TrainingDiverged(TrainerError):
    """The loss (or the parameters) became NaN or infinite; the last good checkpoint is left as it was."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``docker stop``, a preemption notice, ``timeout``), raised in the main thread by
    :func:`raise_terminated`: unwound as Ctrl-C is, so that a training checkpoints the step it reached and the input
    pipeline's workers (and any server a script started) are stopped, where the default action leaves them behind."""


def raise_terminated(signum, frame):
    """A SIGTERM handler: ``signal.signal(signal.SIGTERM, raise_terminated)``."""
    raise Terminated()
