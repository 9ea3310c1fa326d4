"""constraints.txt (scripts/lock.sh) pins every dependency pyproject.toml names, at a version it allows.

CI and the README install with `-c constraints.txt`; a dependency added to pyproject.toml without
regenerating the file would install whatever pip resolves that day, untested. The GPU extra is the one
exception: the lock resolves the CPU install (`.[test,qlora]`), and liger-kernel pulls triton.
"""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

NOT_LOCKED = {"gpu"}  # extras the CPU lock does not resolve


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_name(name)] = Version(version.strip())
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    locked = [r for extra, reqs in extras.items() if extra not in NOT_LOCKED for r in reqs]
    return [Requirement(r) for r in [*project["dependencies"], *locked]]


def _problems(requirements: list[Requirement], pins: dict[str, Version]) -> tuple[list[str], list[str]]:
    """(requirements with no pin, requirements whose pin is outside their range)."""
    unpinned = [str(r) for r in requirements if _name(r.name) not in pins]
    outside = [
        f"{r} pinned {pins[_name(r.name)]}"
        for r in requirements
        if _name(r.name) in pins and pins[_name(r.name)] not in r.specifier
    ]
    return unpinned, outside


def test_every_dependency_is_pinned_at_a_version_pyproject_allows() -> None:
    unpinned, outside = _problems(_requirements(), _pins())
    assert not unpinned, f"not in constraints.txt (run bash scripts/lock.sh): {unpinned}"
    assert not outside, f"pinned outside pyproject.toml's range (run bash scripts/lock.sh): {outside}"


def test_the_check_finds_a_missing_pin_and_one_below_a_raised_minimum() -> None:
    pins = {"pyyaml": Version("6.0.4"), "jinja2": Version("3.1.6")}
    requirements = [Requirement("PyYAML>=6"), Requirement("Jinja2>=3.2"), Requirement("new_package>=1")]
    assert _problems(requirements, pins) == (["new_package>=1"], ["Jinja2>=3.2 pinned 3.1.6"])
