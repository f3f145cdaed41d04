import nonexistent_reward_helpers  # noqa: F401


def reward(completion, answer):
    return 1.0
