"""The one error family camstudy raises for bad input.

Every message names the offending file, row or config key and says how to fix it. The CLI
prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class CamstudyError(Exception):
    """Bad input or an unsatisfiable request; the message says what to fix."""


class ConfigError(CamstudyError):
    """A config key, type or value is wrong."""


class DataError(CamstudyError):
    """Input data (DICOM, label CSV, PNG, manifest) is malformed or inconsistent."""


class WeightsError(CamstudyError):
    """Pretrained or checkpoint weights cannot be found or loaded."""


class TrainingError(CamstudyError):
    """A training run cannot continue (e.g. a non-finite loss)."""
