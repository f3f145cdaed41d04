import os


def reward(completion, answer):
    os._exit(3)
