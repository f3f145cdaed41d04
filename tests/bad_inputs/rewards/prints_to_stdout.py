print('{"score": 99}')  # looks like a reply: must not be read as one


def reward(completion, answer):
    print('{"score": 99}')
    return 0.25
