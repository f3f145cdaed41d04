def score(completion, answer):
    return 1.0
