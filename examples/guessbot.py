"""Guess the number: the example bot of ``dynaprompt chat examples/guessbot.py``.

It shows the pieces of a durable dialog in one small game:

* the secret number comes from a recorded ``call`` (``random.randint``), so a
  resumed conversation keeps the same number instead of drawing a new one;
* ``wait_for_reply(timeout=...)`` lets the bot nudge a silent player;
* ``yes_no`` is a reusable sub-dialog (a plain generator that simply
  ``return``\\ s its answer), called from the async ``guessbot`` dialog;
* every dialog has an explicit, stable ``name=``: the log records names, so
  the functions can be renamed or moved without breaking stored conversations.

Kill the chat at any moment and start it again: the conversation goes on
with the same number and the same count of tries.
"""

from __future__ import annotations

import random

from dynaprompt import call, dialog, finish, send, wait_for_reply

YES = frozenset({"y", "yes", "yeah", "yep", "sure", "ok", "okay"})
NO = frozenset({"n", "no", "nope", "nah"})


@dialog(name="guessbot.yes_no")
def yes_no(question: str):
    """Ask ``question`` until the answer is yes or no; the result is True or False."""
    yield send(f"{question} (yes/no)")
    while True:
        reply = yield wait_for_reply()
        answer = reply.text.strip().lower().rstrip("!.")
        if answer in YES:
            return True
        if answer in NO:
            return False
        yield send("Sorry, I need a yes or a no.")


@dialog(name="guessbot.round")
async def play_round(low: int, high: int, nudge_after: float):
    """One game: pick a number, take guesses until it is found; the result is the number of tries."""
    secret = yield call(random.randint, low, high)
    yield send(f"I'm thinking of a number between {low} and {high}. What's your guess?")
    tries = 0
    nudged = False
    while True:
        # Nudge once per silence: after a nudge, wait as long as it takes.
        reply = yield wait_for_reply(timeout=None if nudged else nudge_after)
        if reply is None:
            nudged = True
            yield send(f"Still there? I'm still thinking of a number between {low} and {high}.")
            continue
        nudged = False
        text = reply.text.strip()
        try:
            guess = int(text)
        except ValueError:
            yield send(f"{text!r} is not a whole number. Try something like {(low + high) // 2}.")
            continue
        if not low <= guess <= high:
            yield send(f"{guess} is out of range: pick a number between {low} and {high}.")
            continue
        tries += 1
        if guess < secret:
            yield send(f"Higher than {guess}.")
        elif guess > secret:
            yield send(f"Lower than {guess}.")
        else:
            yield send(f"Yes, {secret}! You got it in {tries} {'try' if tries == 1 else 'tries'}.")
            yield finish(tries)


@dialog(name="guessbot")
async def guessbot(low: int = 1, high: int = 100, nudge_after: float = 120.0):
    """Play rounds until the player has had enough; the result is the list of tries per game."""
    yield send("Hi! Let's play guess the number.")
    scores: list[int] = []
    while True:
        tries = yield play_round(low, high, nudge_after)
        scores.append(tries)
        again = yield yes_no("Another game?")
        if not again:
            break
    best = min(scores)
    yield send(f"Thanks for playing! {len(scores)} game(s), best score {best}. Bye!")
    yield finish(scores)


# What ``dynaprompt chat examples/guessbot.py`` runs (the module defines three dialogs).
main = guessbot
