"""Conversation history on its own (no ROS): turn, idle and count limits under a fake clock, and the note."""

import threading

import pytest

from lisa_core.prompt import Turn
from lisa_ros.conversations import ConversationLimits, ConversationStore, History, history_note


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def turn(n):
    return Turn(query=f"query {n}", answer=f"answer {n}")


def store(clock=None, **limits):
    return ConversationStore(ConversationLimits(**limits), clock=clock or FakeClock())


def test_empty_id_is_one_shot():
    conversations = store()
    conversations.record("", turn(1))
    assert conversations.history("") == History(turns=(), dropped=0, expired=False)
    assert len(conversations) == 0


def test_turns_come_back_oldest_first_per_conversation():
    conversations = store()
    for n in range(3):
        conversations.record("kitchen", turn(n))
    conversations.record("desk", turn(9))
    assert conversations.history("kitchen") == History(turns=(turn(0), turn(1), turn(2)), dropped=0, expired=False)
    assert conversations.history("desk").turns == (turn(9),)
    assert conversations.history("unknown") == History(turns=(), dropped=0, expired=False)
    assert len(conversations) == 2


def test_max_turns_keeps_the_newest_and_counts_the_dropped():
    conversations = store(max_turns=8)
    for n in range(11):
        conversations.record("c", turn(n))
    history = conversations.history("c")
    assert history.turns == tuple(turn(n) for n in range(3, 11))
    assert history.dropped == 3


def test_max_turns_zero_keeps_no_turns():
    conversations = store(max_turns=0)
    conversations.record("c", turn(1))
    conversations.record("c", turn(2))
    assert conversations.history("c") == History(turns=(), dropped=2, expired=False)


def test_idle_conversation_expires_and_starts_afresh():
    clock = FakeClock()
    conversations = store(clock, idle_expiry_s=300.0)
    conversations.record("c", turn(1))
    clock.now += 300.0  # exactly the limit: still kept
    assert conversations.history("c").turns == (turn(1),)
    clock.now += 300.5
    assert conversations.history("c") == History(turns=(), dropped=0, expired=True)
    assert len(conversations) == 0
    assert conversations.history("c").expired is False  # reported once; the conversation starts afresh
    conversations.record("c", turn(2))
    assert conversations.history("c") == History(turns=(turn(2),), dropped=0, expired=False)


def test_history_counts_as_use():
    clock = FakeClock()
    conversations = store(clock, idle_expiry_s=300.0)
    conversations.record("c", turn(1))
    clock.now += 200.0
    conversations.history("c")
    clock.now += 200.0  # 400 s after recording, 200 s after the last use
    assert conversations.history("c").turns == (turn(1),)


def test_expire_from_a_timer_still_reports_expired_on_next_access():
    clock = FakeClock()
    conversations = store(clock, idle_expiry_s=10.0)
    conversations.record("old", turn(1))
    clock.now += 6.0
    conversations.record("new", turn(2))
    clock.now += 6.0
    assert conversations.expire() == 1
    assert len(conversations) == 1
    assert conversations.expire() == 0
    assert conversations.history("old") == History(turns=(), dropped=0, expired=True)
    assert conversations.history("new").turns == (turn(2),)


def test_zero_idle_expiry_never_forgets():
    clock = FakeClock()
    conversations = store(clock, idle_expiry_s=0.0)
    conversations.record("c", turn(1))
    clock.now += 1e9
    assert conversations.expire() == 0
    assert conversations.history("c") == History(turns=(turn(1),), dropped=0, expired=False)


def test_least_recently_used_conversation_is_forgotten_beyond_max_conversations():
    clock = FakeClock()
    conversations = store(clock, max_conversations=2)
    conversations.record("a", turn(1))
    clock.now += 1.0
    conversations.record("b", turn(2))
    clock.now += 1.0
    conversations.history("a")  # now b is the least recently used
    clock.now += 1.0
    conversations.record("c", turn(3))
    assert len(conversations) == 2
    assert conversations.history("b") == History(turns=(), dropped=0, expired=False)
    assert conversations.history("a").turns == (turn(1),)
    assert conversations.history("c").turns == (turn(3),)


def test_reset_one_and_all():
    conversations = store()
    for cid in ("a", "b", "c"):
        conversations.record(cid, turn(1))
    assert conversations.reset("b") == 1
    assert conversations.reset("b") == 0
    assert conversations.reset("unknown") == 0
    assert conversations.history("b").turns == ()
    assert conversations.history("a").turns == (turn(1),)
    assert conversations.reset() == 2
    assert len(conversations) == 0
    assert conversations.history("a").turns == ()


def test_reset_forgets_that_a_conversation_expired():
    clock = FakeClock()
    conversations = store(clock, idle_expiry_s=1.0)
    conversations.record("a", turn(1))
    conversations.record("b", turn(1))
    clock.now += 2.0
    assert conversations.expire() == 2
    assert conversations.reset("a") == 0
    assert conversations.reset() == 0
    assert conversations.history("a").expired is False
    assert conversations.history("b").expired is False


def test_update_limits_applies_to_kept_conversations_at_once():
    clock = FakeClock()
    conversations = store(clock, max_turns=8, max_conversations=3, idle_expiry_s=0.0)
    for cid in ("a", "b", "c"):
        clock.now += 1.0
        for n in range(5):
            conversations.record(cid, turn(n))
    clock.now += 1.0
    new_limits = ConversationLimits(max_turns=2, max_conversations=2, idle_expiry_s=0.0)
    conversations.update_limits(new_limits)
    assert conversations.limits == new_limits
    assert len(conversations) == 2
    assert conversations.history("a").turns == ()  # the least recently used went
    assert conversations.history("c") == History(turns=(turn(3), turn(4)), dropped=3, expired=False)


def test_shorter_idle_expiry_expires_at_once():
    clock = FakeClock()
    conversations = store(clock, idle_expiry_s=300.0)
    conversations.record("c", turn(1))
    clock.now += 60.0
    conversations.update_limits(ConversationLimits(idle_expiry_s=30.0))
    assert len(conversations) == 0
    assert conversations.history("c").expired is True


@pytest.mark.parametrize("limits, name", [(dict(max_turns=-1), "max_turns=-1"),
                                          (dict(idle_expiry_s=-0.5), "idle_expiry_s=-0.5"),
                                          (dict(max_conversations=0), "max_conversations=0")])
def test_bad_limits_are_refused_naming_the_value(limits, name):
    with pytest.raises(ValueError, match=name):
        ConversationLimits(**limits)


def test_record_refuses_anything_but_a_turn():
    with pytest.raises(TypeError, match="Turn, got tuple"):
        store().record("c", ("query", "answer"))


def test_concurrent_records_all_kept():
    conversations = store(max_turns=10_000)
    threads = [threading.Thread(target=lambda k=k: [conversations.record("c", turn(k * 1000 + n))
                                                    for n in range(500)]) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = conversations.history("c")
    assert sorted(t.query for t in history.turns) == sorted(f"query {k * 1000 + n}" for k in range(4)
                                                            for n in range(500))
    assert history.dropped == 0


LIMITS = ConversationLimits(max_turns=8, idle_expiry_s=300.0)


@pytest.mark.parametrize("dropped_by_limit, dropped_by_tokens, expired, note", [
    (0, 0, False, ""),
    (2, 1, False, "2 oldest turns dropped (max_turns 8); 1 more to fit max_prompt_tokens"),
    (1, 0, False, "1 oldest turn dropped (max_turns 8)"),
    (0, 1, False, "1 oldest turn dropped to fit max_prompt_tokens"),
    (0, 3, False, "3 oldest turns dropped to fit max_prompt_tokens"),
    (0, 0, True, "conversation expired (unused for more than idle_expiry_s 300.0 s); started afresh"),
])
def test_history_note_wording(dropped_by_limit, dropped_by_tokens, expired, note):
    assert history_note(dropped_by_limit, dropped_by_tokens, expired, limits=LIMITS) == note


def test_history_note_refuses_negative_counts():
    with pytest.raises(ValueError, match="-1"):
        history_note(-1, 0, False, limits=LIMITS)
