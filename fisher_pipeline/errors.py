"""Exceptions that name the bad input and what to do about it."""


class FisherPipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FisherPipelineError, ValueError):
    """A configuration value is missing, mistyped or out of range."""


class ModelLoadError(FisherPipelineError):
    """A model path does not exist or does not hold a loadable model."""


class UnsupportedArchitectureError(FisherPipelineError):
    """The model's architecture has no adapter (head slices unknown)."""


class TaskError(FisherPipelineError):
    """A task's source is missing, empty or yields no usable sample."""


class StoreMismatchError(FisherPipelineError, ValueError):
    """A Fisher store was written for another model, task or configuration."""


class StoreFormatError(FisherPipelineError):
    """A path is not a complete Fisher store of a supported format version."""


class StoreContentError(FisherPipelineError, ValueError):
    """A store holds values a phase cannot use (NaN/inf, an all-zero Fisher where one is needed)."""


class PhaseInputError(FisherPipelineError, ValueError):
    """An analysis phase was given inputs it cannot combine (no stores, masks made differently, ...)."""


class OutputPathError(FisherPipelineError):
    """An output path holds something an output must not replace (a user's file, ...)."""


class OutputBusyError(OutputPathError):
    """Another live process is writing the same output path."""


class DiskFullError(FisherPipelineError):
    """The filesystem of an output filled (or its quota was reached) while the output was written."""
