def reward(completion, answer):
    return [1.0, 0.0]
