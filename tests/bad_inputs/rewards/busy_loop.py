def reward(completion, answer):
    while True:  # never returns, never sleeps
        pass
