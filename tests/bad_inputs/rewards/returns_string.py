def reward(completion, answer):
    return "1.0" if answer in completion else "0.0"
