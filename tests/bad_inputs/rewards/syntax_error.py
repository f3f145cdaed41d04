def reward(completion, answer)
    return 1.0
