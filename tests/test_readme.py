"""The README is the front door: its commands must be the ones CI runs and must compose."""

import re
import shlex

import pytest
from conftest import REPO
from omegaconf import OmegaConf

pytestmark = pytest.mark.unit

README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert len(first_block) == 2, "the README opens with two commands: run, and test"
    run_command, test_command = first_block
    assert run_command.endswith("python -m largeml.train")
    assert test_command.endswith("python -m pytest")
    assert test_command in (REPO / ".ci" / "run").read_text()


TRAIN_LINES = sorted({
    line.split("#")[0].strip()
    for line in README.splitlines()
    if line.startswith("python -m largeml.train ")
})


@pytest.mark.parametrize("line", TRAIN_LINES)
def test_readme_train_commands_compose(compose_config, line):
    """Every `python -m largeml.train ...` example composes with the real configs: Hydra
    rejects an unknown group, choice or key."""
    overrides = shlex.split(line.replace("--cfg job", ""))[3:]
    cfg = compose_config(*overrides)
    for override in overrides:
        key = override.split("=", 1)[0]
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key


def test_readme_shows_the_configs_that_exist():
    for group in ("model", "loss", "optimizer", "scheduler", "data"):
        for path in (REPO / "configs" / group).glob("*.yaml"):
            assert f"`{path.stem}`" in README, f"configs/{group}/{path.name} is not in the README"
