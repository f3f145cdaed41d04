reward = 0.5
