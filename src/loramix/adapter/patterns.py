"""PEFT's regular expressions (target_modules, exclude_modules, layers_pattern, rank_pattern / alpha_pattern keys),
compiled and matched with Python's `re` as PEFT matches them, each match bounded in time (PATTERN_SECONDS): with
SIGALRM on the main thread, in a child Python elsewhere (`prematch` matches a whole config in one); `pattern_value`,
PEFT's per-module rank / alpha lookup."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from functools import lru_cache
from typing import Any

from ..errors import LoramixError

# User regular expressions (rank_pattern keys, target_modules and the like) are matched as PEFT matches them, with
# Python's `re`, each match bounded by this many seconds: a pattern that backtracks catastrophically is refused
# instead of hanging. The bound never changes what matches: only whether an answer comes in time.
PATTERN_SECONDS = 0.5


MAX_PATTERN_KEYS = 10_000  # rank_pattern / alpha_pattern keys: one per module of the largest models, with room


def pattern(expr: str, what: str) -> re.Pattern:
    """`expr` compiled with Python's `re` (as PEFT compiles it), or a LoramixError naming `what`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # re's "possible nested set" for a POSIX-like class
            return _compiled(expr)
    except (re.error, TypeError, ValueError, RecursionError, OverflowError, MemoryError) as e:
        raise LoramixError(f"{what}: {expr!r} is not a valid regular expression ({str(e).splitlines()[0][:200]})") from None


@lru_cache(maxsize=4 * MAX_PATTERN_KEYS)
def _compiled(expr: str) -> re.Pattern:
    return re.compile(expr)  # re's own cache holds 512: a bank's patterns are compiled once here


def match(expr: str, text: str, what: str, *, full: bool = True) -> dict[str, str] | None:
    """`expr` matched against `text` with `re` (whole, or from its start when not `full`): the match's named groups
    (a dict, empty when it has none), or None. Bounded by PATTERN_SECONDS: a pattern that takes longer is refused
    (LoramixError naming `what`)."""
    pattern(expr, what)
    try:
        if (expr, text, full) in _PREMATCHED:  # matched ahead in one child Python (`prematch`, off the main thread)
            found = _PREMATCHED[(expr, text, full)]
            if found == "timeout":
                raise TimeoutError
            return found
        return _match(expr, text, full)
    except TimeoutError:
        raise LoramixError(f"{what}: the regular expression {expr!r} takes more than {PATTERN_SECONDS} s to match "
                           f"'{text}' (catastrophic backtracking); simplify it") from None


class _Expired(Exception):
    pass


@lru_cache(maxsize=65_536)
def _match(expr: str, text: str, full: bool) -> dict[str, str] | None:
    """The bounded match of `match` (memoised: a bank's entries share their configs). In the main thread, `re`
    runs here and SIGALRM interrupts it (re checks for signals while it backtracks), an outer timer re-armed after;
    elsewhere (no signals there) it runs in a child Python whose time is bounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return _match_in_child(expr, text, full)

    def expire(*_: Any) -> None:
        raise _Expired

    compiled = _compiled(expr)
    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    outer, _ = signal.setitimer(signal.ITIMER_REAL, PATTERN_SECONDS)
    try:
        m = (compiled.fullmatch if full else compiled.match)(text)
    except _Expired:
        raise TimeoutError from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # a timer of the caller's (e.g. a test's time limit): what was left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))
    return None if m is None else m.groupdict()


def _match_in_child(expr: str, text: str, full: bool) -> dict[str, str] | None:
    """One bounded match in a child Python (`_in_child`)."""
    try:
        answer = _in_child([(expr, text, full)], PATTERN_SECONDS + 2.0)[0]  # + a Python's start
    except subprocess.TimeoutExpired:
        raise TimeoutError from None
    except (IndexError, ValueError, OSError) as e:
        raise LoramixError(f"the regular expression {expr!r} could not be matched: {e}") from None
    if answer == "timeout":
        raise TimeoutError
    return answer


_PREMATCHED: dict[tuple[str, str, bool], Any] = {}  # (expr, text, full) -> groupdict, None, or "timeout"
_CHILD_MANY = """import json, re, signal, sys
class Expired(Exception):
    pass
def expire(*_):
    raise Expired
signal.signal(signal.SIGALRM, expire)
out = []
for expr, text, full in json.load(sys.stdin):
    signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
    try:
        m = (re.fullmatch if full else re.match)(expr, text)
        out.append(None if m is None else m.groupdict())
    except Expired:
        out.append("timeout")
        break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
json.dump(out, sys.stdout)"""


def _in_child(todo: list[tuple[str, str, bool]], seconds: float) -> list[Any]:
    """The answers (groupdict, None, or "timeout", after which none follow) to the matches `todo` ((expr, text,
    full) each), run in a child Python where SIGALRM bounds each by PATTERN_SECONDS; the child by `seconds`."""
    done = subprocess.run([sys.executable, "-I", "-c", _CHILD_MANY, str(PATTERN_SECONDS)], input=json.dumps(todo),
                          capture_output=True, text=True, timeout=seconds)
    if done.returncode:
        raise OSError(done.stderr.strip()[-200:])
    return json.loads(done.stdout)


def prematch(config: dict[str, Any], modules: Any) -> None:
    """Off the main thread, where each bounded match would start a child Python of its own (`_match_in_child`): match
    every regular expression of `config` that `applied_by_peft` and `pattern_value` use against every module name
    in one child Python, each match bounded by PATTERN_SECONDS there, and keep the answers for `match`. Expressions
    that do not compile are left to `match` (which refuses them)."""
    if threading.current_thread() is threading.main_thread() or not hasattr(signal, "setitimer"):
        return
    exprs: list[tuple[str, bool]] = []
    for field_name in ("target_modules", "exclude_modules"):
        if isinstance(config.get(field_name), str):
            exprs.append((config[field_name], True))
    layer_names = config.get("layers_pattern") or []
    exprs += [(rf"(?:^|.*?\.){key}\.(?P<idx>\d+)\.", False) for key in ([layer_names] if isinstance(layer_names, str) else layer_names)]
    for field_name in ("rank_pattern", "alpha_pattern"):
        exprs += [(rf"(.*\.)?({key})$", False) for key in (config.get(field_name) or {})]
    todo = []
    for expr, full in dict.fromkeys(exprs):
        try:
            pattern(expr, "")
        except LoramixError:
            continue
        todo += [(expr, m, full) for m in modules if (expr, m, full) not in _PREMATCHED]
    if not todo:
        return
    try:
        answers = _in_child(todo, PATTERN_SECONDS * len(todo) + 10.0)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return  # `match` answers one at a time
    if len(_PREMATCHED) > 1_000_000:
        _PREMATCHED.clear()
    _PREMATCHED.update(zip(todo, answers))



def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any, what: str = "rank_pattern") -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key `k` with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in (patterns or {}).items():
        if match(rf"(.*\.)?({key})$", module, what, full=False) is not None:
            return value
    return default
