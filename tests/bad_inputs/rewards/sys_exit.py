import sys


def reward(completion, answer):
    sys.exit("giving up")
