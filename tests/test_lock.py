"""The locks `make setup` installs from agree with pyproject.toml's ranges and with each other."""

import re

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
LOCKS = ["requirements/cpu.txt", "requirements/cuda.txt"]


def pins(lock: str) -> dict[str, Version]:
    found = {}
    for line in (REPO / lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            found[match[1].lower().replace("_", "-")] = Version(match[2])
    return found


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [
        Requirement(r)
        for r in [*project["dependencies"], *extras["dev"], *extras["quant"], *extras["deepspeed"]]
    ]


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_pins_every_dependency_within_its_range(lock):
    pinned = pins(lock)
    for req in project_requirements():
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{lock} has no pin for {name}: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{lock} pins {name}=={pinned[name]}, outside pyproject.toml's {req}: run `make lock`"
        )


def test_cpu_and_cuda_locks_pin_the_same_versions():
    cpu, cuda = pins(LOCKS[0]), pins(LOCKS[1])
    assert cpu["torch"].public == cuda["torch"].public and cpu["torch"].local == "cpu"
    differ = {n: (cpu[n], cuda[n]) for n in cpu.keys() & cuda.keys() if n != "torch" and cpu[n] != cuda[n]}
    assert not differ, f"the locks disagree ({differ}): run `make lock`, which writes both"
