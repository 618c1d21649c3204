"""``dynaprompt chat``, run as a real process with piped stdin, stopped, killed and started again."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import ClassVar
from zoneinfo import ZoneInfo

import anyio
import pytest

from dynaprompt import Runner, open_store
from dynaprompt.cli import main
from dynaprompt.events import Called
from dynaprompt.loading import DialogLoadError, load_dialog

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GUESSBOT = str(ROOT / "examples" / "guessbot.py")
TIMEOUT = 30.0  # generous: only a hung process ever waits this long


class Chat:
    """One ``python -m dynaprompt.cli chat ...`` process, read line by line."""

    running: ClassVar[list[Chat]] = []

    def __init__(
        self, *args: str, cwd: Path | None = None, pythonpath: Path | None = None, stdin: int = subprocess.PIPE
    ) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dynaprompt.cli", "chat", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd or ROOT,
            env=env,
        )
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        Chat.running.append(self)

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, pattern: str) -> re.Match[str]:
        """Read output until a line matches ``pattern`` (a regex, matched from the line's start)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.output)) from None
            if line is None:
                stderr = self.process.stderr.read() if self.process.stderr else ""
                raise AssertionError(
                    f"output ended before {pattern!r}:\n" + "\n".join(self.output) + "\nstderr:\n" + stderr
                )
            self.output.append(line)
            match = re.match(pattern, line)
            if match:
                return match

    def say(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def rest(self) -> list[str]:
        """The remaining output, after the process ended."""
        lines = []
        while (line := self._lines.get(timeout=TIMEOUT)) is not None:
            lines.append(line)
        self.output.extend(lines)
        return lines

    def close_stdin(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        return self.process.wait(timeout=TIMEOUT)

    def kill(self) -> int:
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait(timeout=TIMEOUT)

    def stderr(self) -> str:
        return self.process.stderr.read() if self.process.stderr else ""

    def dispose(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self._pump_thread.join(TIMEOUT)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


@pytest.fixture(autouse=True)
def _dispose_chats() -> Iterator[None]:
    """Every process a test started is gone, and its pipes closed, when the test ends."""
    yield
    while Chat.running:
        Chat.running.pop().dispose()


def recorded_secrets(url: str, conversation_id: str = "console") -> list[int]:
    """The numbers the bot drew, as the store recorded them."""

    async def load() -> list[int]:
        store = await open_store(url)
        try:
            return [e.result for e in await store.load(conversation_id) if isinstance(e, Called)]  # type: ignore[misc]
        finally:
            await store.close()

    return anyio.run(load)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/chat.db"


def start_game(url: str) -> tuple[Chat, int, int]:
    """A fresh chat with guessbot, one wrong guess made; returns the chat, the secret and the wrong guess."""
    chat = Chat(GUESSBOT, "--store", url)
    chat.expect(r"-- starting guessbot as conversation 'console'")
    chat.expect(r"bot> Hi! Let's play guess the number\.$")
    chat.expect(r"bot> I'm thinking of a number between 1 and 100\. What's your guess\?$")
    [secret] = recorded_secrets(url)
    wrong = secret % 100 + 1
    chat.say(str(wrong))
    chat.expect(rf"bot> (Higher|Lower) than {wrong}\.$")
    return chat, secret, wrong


def test_chat_continues_after_stdin_closes_with_the_same_number_and_count(url: str) -> None:
    chat, secret, wrong = start_game(url)
    chat.say("fifty")
    chat.expect(r"bot> 'fifty' is not a whole number\.")
    assert chat.close_stdin() == 0
    assert chat.rest() == ["-- left conversation 'console'; run the same command to continue it"]

    again = Chat(GUESSBOT, "--store", url)
    again.expect(r"-- continuing conversation 'console' where it was:$")
    again.expect(rf"you> {wrong}$")
    again.expect(rf"bot> (Higher|Lower) than {wrong}\.$")
    again.expect(r"you> fifty$")
    again.expect(r"-- \(end of earlier messages\)$")
    again.say(str(secret))
    again.expect(rf"bot> Yes, {secret}! You got it in 2 tries\.$")  # the count survived the restart
    again.expect(r"bot> Another game\? \(yes/no\)$")
    again.say("no")
    again.expect(r"bot> Thanks for playing! 1 game\(s\), best score 2\. Bye!$")
    again.expect(r"-- conversation 'console' completed with result \[2\]")
    assert again.process.wait(timeout=TIMEOUT) == 0  # it leaves by itself, stdin still open
    assert recorded_secrets(url) == [secret]

    third = Chat(GUESSBOT, "--store", url)
    third.expect(r"-- starting conversation 'console' again \(its last run completed\)")
    third.expect(r"bot> Hi! Let's play guess the number\.$")
    assert third.close_stdin() == 0


def test_chat_killed_mid_conversation_resumes_where_it_was(url: str) -> None:
    chat, secret, wrong = start_game(url)
    assert chat.kill() == -signal.SIGKILL

    again = Chat(GUESSBOT, "--store", url)
    again.expect(rf"you> {wrong}$")
    again.expect(r"-- \(end of earlier messages\)$")
    again.say(str(secret))
    again.expect(rf"bot> Yes, {secret}! You got it in 2 tries\.$")
    again.expect(r"bot> Another game\? \(yes/no\)$")
    assert again.kill() == -signal.SIGKILL

    third = Chat(GUESSBOT, "--store", url)
    third.expect(r"bot> Another game\? \(yes/no\)$")
    third.expect(r"-- \(end of earlier messages\)$")
    third.say("yes")
    third.expect(r"bot> I'm thinking of a number between 1 and 100\. What's your guess\?$")
    assert third.close_stdin() == 0
    first, _ = recorded_secrets(url)
    assert first == secret  # the first game's number was drawn once, however often the process died


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_leaves_cleanly_and_the_default_store_is_in_the_working_folder(
    tmp_path: Path, stop: signal.Signals
) -> None:
    chat = Chat(GUESSBOT, cwd=tmp_path)
    chat.expect(r"-- store sqlite:///\.dynaprompt/dynaprompt\.db$")
    chat.expect(r"bot> I'm thinking of a number")
    chat.process.send_signal(stop)
    assert chat.process.wait(timeout=TIMEOUT) == 0
    assert chat.rest() == ["-- left conversation 'console'; run the same command to continue it"]
    assert recorded_secrets(f"sqlite:///{tmp_path}/.dynaprompt/dynaprompt.db")


IDLE_BOT = """
    from dynaprompt import dialog, send, wait_for_reply

    @dialog(name="idle")
    async def idle():
        yield send("Say something.")
        reply = yield wait_for_reply(timeout=0.2)
        if reply is None:
            yield send("Still there?")
            reply = yield wait_for_reply()
        yield send(f"You said {reply.text}.")

    @dialog(name="other")
    async def other():
        yield send("I am the other one.")
"""


def test_a_timer_fires_while_the_user_is_idle_with_a_path_colon_function_target(tmp_path: Path) -> None:
    bot = tmp_path / "idle_bot.py"
    bot.write_text(textwrap.dedent(IDLE_BOT))
    chat = Chat(f"{bot}:idle", "--store", f"sqlite:///{tmp_path}/idle.db")
    chat.expect(r"bot> Say something\.$")
    chat.expect(r"bot> Still there\?$")  # nobody typed: the runner's timer loop sent it
    chat.say("hi")
    chat.expect(r"bot> You said hi\.$")
    chat.expect(r"-- conversation 'console' completed")
    assert chat.process.wait(timeout=TIMEOUT) == 0


SCHEDULED_BOT = """
    from dynaprompt import dialog, send, wait_for_reply

    @dialog(name="later")
    async def later():
        yield send("See you in a moment.", )
        yield send("Back again!", at="in 1 second")
        reply = yield wait_for_reply()
        yield send(f"Got {reply.text}.")
"""


def test_a_message_that_fell_due_while_nothing_ran_is_sent_on_start_with_a_module_target(tmp_path: Path) -> None:
    (tmp_path / "later_bot.py").write_text(textwrap.dedent(SCHEDULED_BOT))
    url = f"sqlite:///{tmp_path}/later.db"

    async def start_and_stop() -> None:  # the conversation begins; then nothing runs while its message falls due
        later = load_dialog(f"{tmp_path / 'later_bot.py'}:later")
        store = await open_store(url)
        try:
            async with Runner(store) as runner:
                await runner.start(later, "console")
        finally:
            await store.close()

    anyio.run(start_and_stop)
    time.sleep(1.5)

    chat = Chat("later_bot:later", "--store", url, pythonpath=tmp_path)
    chat.expect(r"bot> See you in a moment\.$")
    chat.expect(r"-- \(end of earlier messages\)$")
    chat.expect(r"bot> Back again!$")
    chat.say("ok")
    chat.expect(r"bot> Got ok\.$")
    assert chat.process.wait(timeout=TIMEOUT) == 0


def test_a_file_with_several_dialogs_and_no_main_is_an_error_listing_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bot = tmp_path / "two_bots.py"
    bot.write_text(textwrap.dedent(IDLE_BOT))
    assert main(["chat", str(bot), "--store", "memory://"]) == 2
    error = capsys.readouterr().err
    assert "defines several dialogs and none is called main" in error
    assert f"{bot}:idle, {bot}:other" in error


def test_a_missing_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", str(tmp_path / "nope.py"), "--store", "memory://"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_live_conversation_of_another_dialog_is_not_hijacked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/chat.db"
    chat = Chat(GUESSBOT, "--store", url)
    chat.expect(r"bot> I'm thinking of a number")
    assert chat.close_stdin() == 0
    bot = tmp_path / "idle_bot2.py"
    bot.write_text(textwrap.dedent(IDLE_BOT))
    other = Chat(f"{bot}:other", "--store", url)
    assert other.process.wait(timeout=TIMEOUT) == 2
    assert "is running dialog 'guessbot', not 'other'" in other.stderr()


def test_a_conversation_that_completes_with_a_send_still_scheduled_stays_until_it_is_sent(tmp_path: Path) -> None:
    (tmp_path / "early_bot.py").write_text(textwrap.dedent(SCHEDULED_BOT))
    chat = Chat("early_bot:later", "--store", f"sqlite:///{tmp_path}/early.db", pythonpath=tmp_path)
    chat.expect(r"bot> See you in a moment\.$")
    chat.say("ok")
    chat.expect(r"-- conversation 'console' completed; run again to start over$")
    assert chat.process.wait(timeout=TIMEOUT) == 0
    # Whichever came first, the scheduled message was shown before the command left.
    assert sorted(chat.output[-3:-1]) == ["bot> Back again!", "bot> Got ok."]


ECHO_V1 = """
    from dynaprompt import dialog, send, wait_for_reply

    @dialog(name="echo")
    async def echo():
        yield send("Hello.")
        while True:
            reply = yield wait_for_reply()
            yield send(f"echo {reply.text}")
"""
ECHO_V2 = ECHO_V1.replace('send("Hello.")', 'send("Hi there.")')


def test_a_conversation_the_code_no_longer_matches_stops_until_fixed_or_restarted(tmp_path: Path) -> None:
    bot = tmp_path / "echo_bot.py"
    url = f"sqlite:///{tmp_path}/echo.db"
    bot.write_text(textwrap.dedent(ECHO_V1))
    chat = Chat(str(bot), "--store", url)
    chat.say("a")
    chat.expect(r"bot> echo a$")
    assert chat.close_stdin() == 0

    bot.write_text(textwrap.dedent(ECHO_V2))  # the first message changed: the log no longer matches
    changed = Chat(str(bot), "--store", url)
    assert changed.process.wait(timeout=TIMEOUT) == 2
    error = changed.stderr()
    assert "diverged from its log at seq 2" in error
    assert "the log recorded send('Hello.'), the code yielded send('Hi there.')" in error
    assert "--restart" in error

    bot.write_text(textwrap.dedent(ECHO_V1))  # fixed: the parked conversation goes on
    fixed = Chat(str(bot), "--store", url)
    fixed.expect(r"you> a$")
    fixed.expect(r"-- it had diverged from the dialog's code; trying the current code$")
    fixed.say("b")
    fixed.expect(r"bot> echo b$")
    assert fixed.close_stdin() == 0

    bot.write_text(textwrap.dedent(ECHO_V2))
    restarted = Chat(str(bot), "--store", url, "--restart")
    restarted.expect(r"-- starting conversation 'console' again \(its last run failed: NondeterminismError")
    restarted.expect(r"bot> Hi there\.$")
    assert restarted.close_stdin() == 0


SLEEPY_BOT = """
    from dynaprompt import dialog, send, sleep_until

    @dialog(name="sleepy")
    async def sleepy():
        yield send("Talk to you tomorrow morning.")
        yield sleep_until("tomorrow at 9am")
        yield send("Good morning!")
"""


def test_tz_sets_the_zone_of_a_new_conversation(tmp_path: Path) -> None:
    bot = tmp_path / "sleepy_bot.py"
    bot.write_text(textwrap.dedent(SLEEPY_BOT))
    url = f"sqlite:///{tmp_path}/sleepy.db"
    chat = Chat(str(bot), "--store", url, "--tz", "Asia/Tokyo")
    chat.expect(r"bot> Talk to you tomorrow morning\.$")
    assert chat.close_stdin() == 0

    async def wake_at() -> datetime | None:
        store = await open_store(url)
        try:
            row = await store.get("console")
            return None if row is None else row.wake_at
        finally:
            await store.close()

    woken = anyio.run(wake_at)
    assert woken is not None
    assert woken.astimezone(ZoneInfo("Asia/Tokyo")).hour == 9  # 9am in Tokyo, not in UTC


def test_an_unknown_zone_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", GUESSBOT, "--store", f"sqlite:///{tmp_path}/x.db", "--tz", "Mars/Olympus"]) == 2
    assert "unknown time zone 'Mars/Olympus'" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_at_a_terminal_ctrl_d_leaves_cleanly(url: str) -> None:
    """Input from a real (pseudo-)terminal, line by line, and end of input as the keyboard sends it."""
    terminal, child_side = os.openpty()
    try:
        chat = Chat(GUESSBOT, "--store", url, stdin=child_side)
        chat.expect(r"bot> I'm thinking of a number between 1 and 100")
        os.write(terminal, b"fifty\n")
        chat.expect(r"bot> 'fifty' is not a whole number\.")
        os.write(terminal, b"\x04")  # Ctrl-D
        assert chat.process.wait(timeout=TIMEOUT) == 0
        assert chat.rest() == ["-- left conversation 'console'; run the same command to continue it"]
    finally:
        os.close(terminal)
        os.close(child_side)


# -- how a target names a dialog (dynaprompt.loading, shared by every command) ---------------


def test_a_target_resolves_main_then_the_only_dialog_then_an_attribute(tmp_path: Path) -> None:
    (tmp_path / "only_one.py").write_text(
        "from dynaprompt import dialog, send\n\n@dialog(name='solo')\ndef solo():\n    yield send('hi')\n"
    )
    assert load_dialog(str(tmp_path / "only_one.py")).name == "solo"
    assert load_dialog(GUESSBOT).name == "guessbot"  # `main` wins over the three dialogs it defines
    assert load_dialog(f"{GUESSBOT}:play_round").name == "guessbot.round"


@pytest.mark.parametrize(
    ("source", "target_suffix", "message"),
    [
        ("x = 1\n", "", "defines no @dialog"),
        ("def f():\n    return 1\n", ":f", "is a function, not a @dialog"),
        ("x = 1\n", ":missing", "has no attribute 'missing'"),
        ("def broken(:\n", "", "importing"),
        ("raise RuntimeError('boom')\n", "", "RuntimeError: boom"),
    ],
    ids=["no-dialog", "not-a-dialog", "no-attribute", "syntax-error", "raises-on-import"],
)
def test_a_bad_target_is_a_clear_error(tmp_path: Path, source: str, target_suffix: str, message: str) -> None:
    bot = tmp_path / f"bad_{tmp_path.name}.py"  # a module name of its own in this process
    bot.write_text(source)
    with pytest.raises(DialogLoadError, match=re.escape(message)):
        load_dialog(f"{bot}{target_suffix}")


def test_an_unknown_module_is_a_clear_error() -> None:
    with pytest.raises(DialogLoadError, match="cannot import module 'no_such_bot_module'"):
        load_dialog("no_such_bot_module:bot")
