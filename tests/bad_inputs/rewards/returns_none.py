def reward(completion, answer):
    score = 1.0 if completion.strip().endswith(answer) else 0.0  # computed, never returned
