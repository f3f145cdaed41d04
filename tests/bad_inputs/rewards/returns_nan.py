def reward(completion, answer):
    return float("nan")
