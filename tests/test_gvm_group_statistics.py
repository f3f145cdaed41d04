"""Online GVM for prompts never seen, from the statistics of their group (`statistics.unseen_prompts:
group`): the pure policy, the group store, the config check and the data field that names groups."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from rl_service.algorithms.gvm import gvm_allocation, online_gvm_allocation
from rl_service.statistics.prompt_stats import GroupStatistics, group_ids, group_mean, group_totals


def _inputs(seen, p, g, has_g):
    return {"seen": np.asarray(seen, bool), "acceptance_rate": np.asarray(p, float),
            "grad_norm": np.asarray(g, float), "has_grad_norm": np.asarray(has_g, bool)}


def test_an_unseen_prompt_takes_its_seen_groups_statistics_instead_of_a_pilot():
    # Prompts 0, 1 seen; 2 unseen with a seen group (p 0.1, G 4); 3 unseen, its group never seen.
    prompts = _inputs([True, True, False, False], [0.5, 0.9, 0, 0], [1.0, 2.0, 0, 0], [True, True, False, False])
    group = _inputs([True, True, True, False], [0.4, 0.8, 0.1, 0.0], [9, 9, 4.0, 0], [True, True, True, False])
    counts = online_gvm_allocation(**prompts, budget=40, alpha=1e-3, beta=2.0, n_min=1, n_pilot=4, group=group)
    # By hand: prompt 3 is piloted (4); the other 36 go by GVM over p = (0.5, 0.9, 0.1), G = (1, 2, 4) —
    # a seen prompt keeps its own statistics, the group only stands in for what was never seen.
    assert counts[3] == 4
    assert counts[:3].tolist() == gvm_allocation([0.5, 0.9, 0.1], [1.0, 2.0, 4.0], 36, n_min=1).tolist()
    w = np.array([1 / np.sqrt(0.5 + 1e-3 / 0.5), 2 / np.sqrt(0.9 + 1e-3 / 0.9), 4 / np.sqrt(0.1 + 1e-3 / 0.1)])
    assert counts[:3].tolist() == np.rint(36 * w / w.sum()).astype(int).tolist() == [3, 5, 28]  # 3.26, 4.87, 27.87


def test_without_seen_groups_the_policy_is_the_per_prompt_one():
    prompts = _inputs([True, False, True, False], [0.25, 0, 0.75, 0], [3.0, 0, 1.0, 0], [True, False, True, False])
    plain = online_gvm_allocation(**prompts, budget=32, n_pilot=4)
    unseen_groups = _inputs([False] * 4, [0.0] * 4, [0.0] * 4, [False] * 4)
    assert online_gvm_allocation(**prompts, budget=32, n_pilot=4, group=unseen_groups).tolist() == plain.tolist()
    with pytest.raises(ValueError, match="group statistics cover 2 prompts, the batch has 4"):
        online_gvm_allocation(**prompts, budget=32, group=_inputs([True] * 2, [0.5] * 2, [1.0] * 2, [True] * 2))


def test_group_ids_are_stable_hashes_and_none_has_no_group():
    expected = int.from_bytes(hashlib.sha256(b"level_3").digest()[:5], "big")
    ids = group_ids(["level_3", None, "level_3", "level_4"])
    assert ids.tolist()[:3] == [expected, -1, expected]
    assert 0 <= ids[3] < 2**40 and ids[3] != expected


def test_group_totals_pool_counts_and_group_mean_skips_missing_norms():
    ids = np.array([7, -1, 3, 7, 3])
    unique, accepted, samples = group_totals(ids, [1, 5, 0, 3, 2], [4, 8, 4, 4, 8])
    assert unique.tolist() == [3, 7] and accepted.tolist() == [2, 4] and samples.tolist() == [12, 8]
    unique, means = group_mean(ids, [np.nan, 1.0, np.nan, 2.0, 6.0])
    assert unique.tolist() == [3, 7] and means.tolist() == [6.0, 2.0]
    _, means = group_mean(np.array([5, 5]), [np.nan, np.inf])
    assert np.isnan(means).all()   # no finite norm in the group: nothing to fold in


def test_group_store_pools_its_prompts_and_reads_each_prompts_group():
    store = GroupStatistics(ema_weight=0.5)
    # Two prompts of level 1 (3/8 and 1/4 accepted) and one of level 2: level 1's rate is 4/12.
    store.update_acceptance_of_groups(["l1", "l2", "l1", None], [3, 0, 1, 5], [8, 4, 4, 8])
    store.update_grad_norms_of_groups(["l1", "l2", "l1", None], [2.0, np.nan, 3.0, 9.0])
    inputs = store.allocation_inputs_of_groups(["l2", "l1", None, "l1", "l3"], laplace=False)
    assert inputs["seen"].tolist() == [True, True, False, True, False]
    assert inputs["acceptance_rate"] == pytest.approx([0.0, 1 / 3, 0.0, 1 / 3, 0.0])
    assert inputs["grad_norm"].tolist() == [0.0, 2.5, 0.0, 2.5, 0.0]
    assert inputs["has_grad_norm"].tolist() == [False, True, False, True, False]
    # A second batch moves level 1 by the EMA rule: 0.5 · 1/3 + 0.5 · 1.
    store.update_acceptance_of_groups(["l1"], [4], [4])
    assert store.allocation_inputs_of_groups(["l1"], laplace=False)["acceptance_rate"] == pytest.approx([2 / 3])


def test_unseen_prompts_group_is_refused_without_groups_or_outside_online_mode(tmp_path):
    from rl_service.config import load_config
    from rl_service.errors import ConfigError

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "1+1?", "answer": "2", "level": 1}) + "\n")
    base = ["statistics.allocation=gvm", "statistics.unseen_prompts=group"]
    load_config(None, base)   # the built-in task names its levels
    with pytest.raises(ConfigError, match="set data.group_field"):
        load_config(None, [*base, "data.source=jsonl", f"data.train_path={train}"])
    load_config(None, [*base, "data.source=jsonl", f"data.train_path={train}", "data.group_field=level"])
    with pytest.raises(ConfigError, match="applies to statistics.mode 'online'"):
        load_config(None, [*base, "statistics.mode=step_pilot"])
    with pytest.raises(ConfigError, match="applies to statistics.allocation 'gvm'"):
        load_config(None, ["statistics.unseen_prompts=group"])


def test_a_file_names_each_prompts_group_and_a_missing_group_names_its_line(tmp_path):
    from rl_service.data.prompts import load_prompt_file
    from rl_service.errors import DataError

    rows = [{"prompt": "2+2?", "answer": "4", "level": 1}, {"prompt": "Integrate x.", "answer": "x^2/2", "level": "Level 5"}]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [record.group for record in load_prompt_file(good, "level")] == ["1", "Level 5"]
    assert [record.group for record in load_prompt_file(good)] == [None, None]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "3+3?", "answer": "6"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'level' \(the prompt's group\)"):
        load_prompt_file(bad, "level")
