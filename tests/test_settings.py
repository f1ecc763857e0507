"""Settings read from the environment: each variable as its setting's type, or an error that names it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.settings import Settings


@dataclass(frozen=True)
class WithSwitch(Settings):
    # No setting of segserve's is a boolean yet: the first one must read "false" as False.
    switch: bool = False


@pytest.mark.parametrize("raw", ["true", "1", "yes", "on", "TRUE", " On "])
def test_true_is_read_from_words(raw: str) -> None:
    assert WithSwitch.from_env({"SEGSERVE_SWITCH": raw}).switch is True


@pytest.mark.parametrize("raw", ["false", "0", "no", "off", "False"])
def test_false_is_read_from_words(raw: str) -> None:
    assert WithSwitch.from_env({"SEGSERVE_SWITCH": raw}).switch is False


@pytest.mark.parametrize("raw", ["", "2", "y", "enabled", "nope", "truthy"])
def test_any_other_word_is_an_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match=f"SEGSERVE_SWITCH={raw!r} is not a boolean"):
        WithSwitch.from_env({"SEGSERVE_SWITCH": raw})


def test_numbers_and_strings_keep_their_types() -> None:
    settings = Settings.from_env(
        {"SEGSERVE_MAX_QUEUED": "5", "SEGSERVE_RETRY_DELAY": "0.1", "SEGSERVE_API_KEYS": "a"}
    )
    assert (settings.max_queued, settings.retry_delay, settings.api_keys) == (5, 0.1, "a")
    assert Settings.from_env({}) == Settings()
    with pytest.raises(ValueError, match="SEGSERVE_MAX_QUEUED='many' is not a valid int"):
        Settings.from_env({"SEGSERVE_MAX_QUEUED": "many"})
