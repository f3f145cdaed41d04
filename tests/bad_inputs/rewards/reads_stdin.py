def reward(completion, answer):
    return float(input())
