"""What a custom reward may read under bubblewrap (rl_service/rewards/sandbox.py): its own file and
the paths `reward.custom_readable` lists, read-only, never its directory (neighbour modules,
secrets next to it, the host's /tmp); the listed paths are checked before Ray starts."""
from __future__ import annotations

import os
import textwrap

import pytest

from rl_service.config import load_config
from rl_service.errors import ConfigError, UserError
from rl_service.rewards.custom import CustomRewardSpec, check_custom_reward, custom_reward_spec
from test_reward_sandbox import _score, needs_bwrap

# -- the review's finding 1: the reward file, not its directory ------------------------------------

NEIGHBOURS = '''
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def read_secret(completion, answer):
    # 1.0 only if the read failed: a sandbox that shows the file's directory scores 0, not an error.
    try:
        open(os.path.join(HERE, "secret.txt")).read()
    except OSError:
        return 1.0
    return 0.0


def read_listed(completion, answer):
    return float(open(os.path.join(HERE, answer)).read() == "42")


def import_helper(completion, answer):
    import helper
    return helper.VALUE
'''


@pytest.fixture
def neighbours(tmp_path, monkeypatch):
    """reward.py with a secret, a data file, a helper module and a data folder next to it; the
    working directory is their folder, so `reward.custom_readable` names them relatively."""
    (tmp_path / "reward.py").write_text(NEIGHBOURS)
    (tmp_path / "secret.txt").write_text("s3cret")
    (tmp_path / "data.txt").write_text("42")
    (tmp_path / "helper.py").write_text("VALUE = 7.0\n")
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.txt").write_text("42")
    monkeypatch.chdir(tmp_path)

    def spec(function: str, readable: list[str] = (), sandbox: str = "auto") -> CustomRewardSpec:
        config = load_config(None, [f"reward.custom=reward.py:{function}", f"reward.custom_readable={list(readable)}",
                                    f"reward.custom_sandbox={sandbox}", "reward.custom_timeout_s=5"])
        return custom_reward_spec(config.reward)

    return spec


@needs_bwrap
def test_the_reward_reads_its_own_file_and_the_listed_paths_not_its_directory(neighbours):
    assert _score(neighbours("read_secret"))[0] == 1.0                  # the read raised: not visible
    assert _score(neighbours("read_secret", ["data.txt"]))[0] == 1.0    # listing another file shows only that one
    assert _score(neighbours("read_secret", sandbox="off"))[0] == 0.0   # the control: unconfined, it reads it
    # A listed file or folder is readable, read-only; unlisted, the read fails (scores 0, counted).
    assert _score(neighbours("read_listed", ["data.txt"]), answer="data.txt") == (
        1.0, {"custom_reward_errors": 0, "custom_reward_timeouts": 0, "custom_reward_restarts": 0})
    assert _score(neighbours("read_listed", ["tables"]), answer="tables/t.txt")[0] == 1.0
    assert _score(neighbours("read_listed"), answer="data.txt")[1]["custom_reward_errors"] == 1


@needs_bwrap
def test_a_neighbour_module_imports_only_when_listed(neighbours, tmp_path):
    assert _score(neighbours("import_helper", ["helper.py"]))[0] == 7.0
    assert _score(neighbours("import_helper"))[1]["custom_reward_errors"] == 1
    # Imported at the module's top, the missing neighbour fails the check before Ray starts.
    (tmp_path / "top.py").write_text("import helper\n\n\ndef reward(completion, answer):\n    return helper.VALUE\n")
    with pytest.raises(UserError, match="No module named 'helper'"):
        check_custom_reward(CustomRewardSpec(str(tmp_path / "top.py"), "reward"))
    check_custom_reward(CustomRewardSpec(str(tmp_path / "top.py"), "reward", readable=(str(tmp_path / "helper.py"),)))


@needs_bwrap
def test_a_reward_file_directly_under_tmp_runs_and_keeps_its_scratch_tmp():
    """The file's folder is the host's /tmp: only the file is bound, inside the scratch /tmp, so the
    function still writes its scratch and sees nothing else of the host's /tmp."""
    import tempfile

    descriptor, reward = tempfile.mkstemp(prefix="rl_sandbox_test_", suffix=".py", dir="/tmp")
    secret = reward[:-3] + "_secret.txt"
    own = f"/tmp/{os.path.basename(reward)[:-3]}_own.txt"
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(textwrap.dedent(f'''
                import os

                def reward(completion, answer):
                    with open({own!r}, "w") as scratch:     # the scratch /tmp is still writable
                        scratch.write("fine")
                    try:
                        open({secret!r}).read()             # a neighbour in the host's /tmp
                        return 0.0
                    except OSError:
                        pass
                    listed = set(os.listdir("/tmp"))
                    return float(open({own!r}).read() == "fine" and {os.path.basename(secret)!r} not in listed
                                 and {os.path.basename(reward)!r} in listed)
            '''))
        with open(secret, "w") as file:
            file.write("s3cret")
        assert _score(CustomRewardSpec(reward, "reward", 5.0, 256)) == (
            1.0, {"custom_reward_errors": 0, "custom_reward_timeouts": 0, "custom_reward_restarts": 0})
        assert not os.path.exists(own)           # written to the scratch, not the host's /tmp
    finally:
        for path in (reward, secret, own):
            if os.path.exists(path):
                os.unlink(path)


def test_custom_readable_paths_are_checked_before_ray_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("42")
    (tmp_path / "reward.py").write_text("def reward(completion, answer):\n    return 1.0\n")
    assert load_config(None, ["reward.custom_readable=[data.txt]"]).reward.custom_readable == ["data.txt"]
    assert load_config(None).reward.custom_readable == []
    # A path may exist only on a cluster's nodes (`submit --no-local-check`): loading the config
    # accepts it; the check before Ray starts, where the job runs, names it.
    config = load_config(None, ["reward.custom=reward.py:reward", "reward.custom_readable=[data.txt, missing.txt]"])
    with pytest.raises(UserError, match=r"reward\.custom_readable\[1\]: missing\.txt: no such file or directory"):
        check_custom_reward(custom_reward_spec(config.reward))
    for hiding in ("/tmp", "/"):     # would hide the scratch /tmp and show the host's
        with pytest.raises(ConfigError, match=r"reward\.custom_readable\[0\]: .*not / or /tmp"):
            load_config(None, [f"reward.custom_readable=[{hiding}]"])
