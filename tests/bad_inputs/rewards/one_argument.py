def reward(completion):
    return 1.0
