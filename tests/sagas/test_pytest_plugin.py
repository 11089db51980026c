"""The pytest plugin's hypothesis profiles: registered under sagas- names, loaded only when asked.

Each case runs pytest in a subprocess (pytester), as a project that installs sagas would, so that no
profile loaded there leaks into this session.
"""

from __future__ import annotations

import re

import pytest

PROBE = """
from hypothesis import settings


def test_probe():
    print("profile:", settings.get_current_profile_name(), settings().max_examples)
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A project of its own, run with neither CI nor HYPOTHESIS_PROFILE set."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    pytester.makepyfile(test_probe=PROBE)
    return pytester


def loaded(project: pytest.Pytester, *args: str) -> str:
    """Run the project's probe and return the profile it ran with, and its max_examples."""
    result = project.runpytest_subprocess("-s", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)
    (found,) = re.findall(r"profile: (\S+ \d+)", result.stdout.str())
    return str(found)


def test_a_users_own_ci_profile_is_untouched(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A project's own ci and dev profiles keep their settings, and the one it loads stays loaded."""
    project.makeconftest(
        """
        import os

        from hypothesis import settings

        settings.register_profile("ci", max_examples=7)
        settings.register_profile("dev", max_examples=3)
        settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
        """
    )
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "ci")
    assert loaded(project) == "ci 7"


def test_no_profile_is_loaded_unless_asked(project: pytest.Pytester) -> None:
    """Without --hypothesis-profile or HYPOTHESIS_PROFILE, hypothesis keeps its default profile."""
    project.makeconftest(
        """
        from hypothesis import settings


        def pytest_configure(config):
            assert settings.get_profile("sagas-ci").max_examples == 100  # registered all the same
        """
    )
    assert loaded(project) == "default 100"


def test_the_command_line_loads_a_sagas_profile(project: pytest.Pytester) -> None:
    """hypothesis's own --hypothesis-profile finds the sagas- profiles."""
    assert loaded(project, "--hypothesis-profile=sagas-thorough") == "sagas-thorough 2000"


def test_hypothesis_profile_in_the_environment_loads_a_sagas_profile(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HYPOTHESIS_PROFILE=sagas-dev loads it; the command line wins over the environment."""
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "sagas-dev")
    assert loaded(project) == "sagas-dev 50"
    assert loaded(project, "--hypothesis-profile=sagas-ci") == "sagas-ci 100"
