"""study.progress: the time left as the stages' progress lines write it."""

import pytest

from study.progress import duration_text


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (0.4, "0s"), (42, "42s"), (59.4, "59s"),
    (59.6, "1m00s"),  # rounded to whole seconds before splitting into minutes
    (185, "3m05s"), (3599, "59m59s"),
    (3600, "1h00m"), (3720, "1h02m"), (3779, "1h02m"),  # with hours, seconds are left out
    (36000 + 59 * 60, "10h59m"),
])
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text
