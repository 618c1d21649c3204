"""Ember, a small-talk bot built from the reusable blocks in ``blocks.py``.

It asks your name, tells a random aside about a pet of that name (picked with
``call()``, so the pick is recorded once and every replay sees the same pet), asks
whether you want to talk, lets you pick a topic (dragons or the weather), follows a
few turns on it and says goodbye. Go quiet for ten minutes and it checks on you once.

Talk to it in a terminal, or serve it over HTTP::

    dynaprompt chat examples/dragons.py
    dynaprompt serve examples/dragons.py --store sqlite:///dragons.db
"""

from __future__ import annotations

import random

from blocks import multichoice, prompt, yes_no

from dynaprompt import call, dialog, finish, send

PETS = ["cat", "dog", "goldfish", "parrot", "tortoise", "hamster", "gecko"]
NUDGE = "Still there? No rush, I'll wait."
TOPICS = ["dragons", "the weather"]


def pick_pet() -> str:
    """A side effect (randomness) that must not change on replay: run it through ``call()``."""
    return random.choice(PETS)


@dialog(name="dragons.about_dragons")
async def about_dragons(name: str):
    favourite = yield prompt("Which dragon is your favourite, real or legendary?", nudge=NUDGE)
    yield send(f"{favourite.strip()}! A fine choice, {name}.")
    ride = yield yes_no("Would you ride a dragon if one offered?", "A simple yes or no will do.", nudge=NUDGE)
    yield send("Brave! Bring a warm coat, it's chilly up there." if ride else "Wise. They do sneeze fire.")
    colour = yield multichoice("What colour would yours be?", "Pick one of the numbers.", ["red", "green", "gold"])
    yield send(f"A {colour} dragon. I can picture it already.")


@dialog(name="dragons.about_weather")
async def about_weather(name: str):
    sky = yield prompt("What's the weather like where you are?", nudge=NUDGE)
    yield send(f"{sky.strip().capitalize()}, noted. Here it's dragon-breath warm.")
    rain = yield yes_no("Do you like the rain?", "A simple yes or no will do.", nudge=NUDGE)
    yield send("Me too: it puts out the accidental fires." if rain else "Fair enough, it ruins a good flight.")


@dialog(name="dragons")
async def main():
    name = (yield prompt("Hi, I'm Ember. What's your name?", nudge=NUDGE)).strip()
    pet = yield call(pick_pet)
    yield send(f"{name}! My neighbour has a {pet} called {name}. It bites.")
    talk = yield yes_no(f"Do you have a minute to talk, {name}?", "Just yes or no, please.", nudge=NUDGE)
    if not talk:
        yield send(f"Another time then. Goodbye, {name}!")
        yield finish("declined")
    topic = yield multichoice("What shall we talk about?", "Please pick a number from the list.", TOPICS, nudge=NUDGE)
    if topic == "dragons":
        yield about_dragons(name)
    else:
        yield about_weather(name)
    yield send(f"That was lovely, {name}. Goodbye!")
    yield finish(topic)
