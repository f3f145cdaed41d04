def reward(completion, answer):
    table = bytearray(2 * 2**30)  # 2 GiB, past the case's memory limit
    return float(len(table))
