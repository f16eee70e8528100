"""Earlier turns per conversation id, so a follow-up query is answered with its history in the prompt.

A query with an empty conversation id is one-shot: nothing is read or kept. Limits bound what is kept:
turns per conversation, idle time and the number of conversations (least recently used go first).
Expiry is checked on every access, and `expire()` can be called from a timer. No ROS imports; the
clock is injected so the limits are tested with a fake one.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from lisa_core.prompt import Turn


@dataclass(frozen=True)
class ConversationLimits:
    """How much history is kept (the node's dynamic parameters)."""

    max_turns: int = 8  # earlier turns kept per conversation (oldest dropped); 0 keeps none
    idle_expiry_s: float = 300.0  # a conversation unused this long is forgotten; 0 = never
    max_conversations: int = 64  # least recently used forgotten beyond this

    def __post_init__(self):
        if self.max_turns < 0 or self.idle_expiry_s < 0 or self.max_conversations < 1:
            raise ValueError(f"max_turns and idle_expiry_s must be >= 0 and max_conversations >= 1, got "
                             f"max_turns={self.max_turns}, idle_expiry_s={self.idle_expiry_s}, "
                             f"max_conversations={self.max_conversations}")


@dataclass(frozen=True)
class History:
    """The earlier turns a query is answered with, and what was left out."""

    turns: tuple[Turn, ...]  # what goes into the prompt, oldest first
    dropped: int  # oldest turns of the conversation left out by max_turns
    expired: bool  # the conversation existed but had expired (started afresh)


ONE_SHOT = History(turns=(), dropped=0, expired=False)


def history_note(dropped_by_limit: int, dropped_by_tokens: int, expired: bool, *,
                 limits: ConversationLimits) -> str:
    """What a result says about its history, e.g. '2 oldest turns dropped (max_turns 8); 1 more to fit
    max_prompt_tokens', or '' when the whole conversation went into the prompt."""
    if dropped_by_limit < 0 or dropped_by_tokens < 0:
        raise ValueError(f"dropped turn counts must be >= 0, got {dropped_by_limit} and {dropped_by_tokens}")
    parts = []
    if expired:
        parts.append(f"conversation expired (unused for more than idle_expiry_s {limits.idle_expiry_s} s); "
                     "started afresh")
    if dropped_by_limit:
        parts.append(f"{_turns(dropped_by_limit)} dropped (max_turns {limits.max_turns})")
    if dropped_by_tokens:
        parts.append(f"{dropped_by_tokens} more to fit max_prompt_tokens" if dropped_by_limit
                     else f"{_turns(dropped_by_tokens)} dropped to fit max_prompt_tokens")
    return "; ".join(parts)


def _turns(count: int) -> str:
    return f"{count} oldest turn{'' if count == 1 else 's'}"


@dataclass
class _Conversation:
    turns: list[Turn] = field(default_factory=list)  # the newest max_turns
    recorded: int = 0  # every turn ever recorded, kept or not
    last_used: float = 0.0


class ConversationStore:
    """Conversations by id; every method is safe from any thread.

    Both `history` and `record` count as use (for expiry and for least-recently-used order). An id whose
    conversation expired is remembered (as many as max_conversations), so its next `history` says
    `expired` whether the expiry was found on access or by `expire()`.
    """

    def __init__(self, limits: ConversationLimits, clock: Callable[[], float] = time.monotonic):
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._conversations: collections.OrderedDict[str, _Conversation] = collections.OrderedDict()
        self._expired_ids: collections.OrderedDict[str, bool] = collections.OrderedDict()  # as a set, in order

    @property
    def limits(self) -> ConversationLimits:
        return self._limits

    def history(self, conversation_id: str) -> History:
        """The turns to answer the next query of `conversation_id` with; '' is one-shot (no turns)."""
        if not conversation_id:
            return ONE_SHOT
        with self._lock:
            self._expire_locked()
            expired = self._expired_ids.pop(conversation_id, False)
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                return History(turns=(), dropped=0, expired=expired)
            self._touch_locked(conversation_id, conversation)
            return History(turns=tuple(conversation.turns), dropped=conversation.recorded - len(conversation.turns),
                           expired=False)

    def record(self, conversation_id: str, turn: Turn) -> None:
        """Adds an answered turn to `conversation_id` (starting it if new); '' keeps nothing."""
        if not conversation_id:
            return
        if not isinstance(turn, Turn):
            raise TypeError(f"record() takes a lisa_core.prompt.Turn, got {type(turn).__name__}")
        with self._lock:
            self._expire_locked()
            self._expired_ids.pop(conversation_id, False)
            conversation = self._conversations.setdefault(conversation_id, _Conversation())
            conversation.turns.append(turn)
            conversation.recorded += 1
            self._trim_locked(conversation)
            self._touch_locked(conversation_id, conversation)
            self._evict_locked()

    def reset(self, conversation_id: str = "") -> int:
        """Forgets `conversation_id`, or every conversation for ''; returns how many were forgotten."""
        with self._lock:
            self._expire_locked()
            if not conversation_id:
                forgotten = len(self._conversations)
                self._conversations.clear()
                self._expired_ids.clear()
                return forgotten
            self._expired_ids.pop(conversation_id, False)
            return 0 if self._conversations.pop(conversation_id, None) is None else 1

    def expire(self) -> int:
        """Forgets the conversations unused for longer than idle_expiry_s; returns how many."""
        with self._lock:
            return self._expire_locked()

    def update_limits(self, limits: ConversationLimits) -> None:
        """Applies new limits now: conversations are cut to max_turns, the idle expired, the least
        recently used beyond max_conversations forgotten."""
        with self._lock:
            self._limits = limits
            for conversation in self._conversations.values():
                self._trim_locked(conversation)
            self._expire_locked()
            self._evict_locked()

    def __len__(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._conversations)

    # ---- called holding the lock ----------------------------------------------------------------
    def _touch_locked(self, conversation_id: str, conversation: _Conversation) -> None:
        conversation.last_used = self._clock()
        self._conversations.move_to_end(conversation_id)

    def _trim_locked(self, conversation: _Conversation) -> None:
        excess = len(conversation.turns) - self._limits.max_turns
        if excess > 0:
            del conversation.turns[:excess]

    def _evict_locked(self) -> None:
        while len(self._conversations) > self._limits.max_conversations:
            self._conversations.popitem(last=False)

    def _expire_locked(self) -> int:
        idle_limit = self._limits.idle_expiry_s
        if idle_limit == 0:
            return 0
        now = self._clock()
        stale = [cid for cid, conversation in self._conversations.items() if now - conversation.last_used > idle_limit]
        for conversation_id in stale:
            del self._conversations[conversation_id]
            self._expired_ids[conversation_id] = True
        while len(self._expired_ids) > self._limits.max_conversations:
            self._expired_ids.popitem(last=False)
        return len(stale)
