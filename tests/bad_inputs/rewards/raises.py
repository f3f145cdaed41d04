def reward(completion, answer):
    return 1.0 / len(answer.strip('0123456789'))  # ZeroDivisionError for numbers
