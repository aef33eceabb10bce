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


class StoreError(CamstudyError):
    """The study store cannot be written (a full disk), or a file a stage vouched for is damaged."""


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: a hostile input (a megabyte string, a deeply
    aliased YAML document) never floods or stalls an error message."""
    import reprlib

    brief = reprlib.Repr()  # keyword arguments need Python 3.12
    brief.maxlevel, brief.maxdict = 3, 6
    brief.maxlist = brief.maxtuple = brief.maxset = 6
    brief.maxstring = brief.maxother = limit
    brief.maxlong = 40
    short = brief.repr(value)
    return short if len(short) <= limit else short[:limit] + "..."


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """A ConfigError naming `key`, the value given and what is allowed, unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {shown(value)} is not valid; use {allowed}")
