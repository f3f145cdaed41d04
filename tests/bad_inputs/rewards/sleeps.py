import time


def reward(completion, answer):
    time.sleep(30)  # far past the case's time limit
    return 1.0
