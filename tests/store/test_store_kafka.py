"""KVLog over a real Kafka broker: the mapping, read-your-writes, following, restart and rebuild."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import topic_records, wait_until
from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from kvlog import (
    BrokerUnavailableError,
    ClosedError,
    KVLog,
    KVLogError,
    RecordTooLargeError,
    TopicConfigError,
)
from kvlog import replay as replay_module

pytestmark = pytest.mark.kafka


def delete_topic(admin: Any, topic: str) -> None:
    """Delete ``topic`` and wait until the broker no longer lists it."""
    admin.delete_topics([topic])
    wait_until(lambda: topic not in admin.list_topics(), timeout=30, what="topic deletion")


class TestRestartAndRebuild:
    def test_warm_restart_replays_only_the_tail(self, make_kv: Any) -> None:
        kv = make_kv("a")
        kv.update({f"k{i}": i for i in range(1000)})
        kv.close()
        other = make_kv("b")
        other.update({f"new{i}": i for i in range(7)})
        reopened = make_kv("a")
        stats = reopened.stats()
        assert stats["open_replay"]["mode"] == "warm"
        assert stats["open_replay"]["records"] == 7
        assert stats["records_replayed"] == 7
        assert len(reopened) == 1007

    def test_deleted_cache_is_rebuilt_with_the_same_contents(self, make_kv: Any, tmp_path: Path) -> None:
        kv = make_kv("a")
        kv.update({f"k{i}": {"i": i} for i in range(300)})
        del kv["k5"]
        before = dict(kv)
        kv.close()
        shutil.rmtree(tmp_path / "a")
        reopened = make_kv("a")
        assert reopened.stats()["open_replay"]["mode"] == "cold"
        assert dict(reopened) == before

    def test_rewarm_rebuilds_and_reports(self, make_kv: Any) -> None:
        kv = make_kv()
        kv.update({f"k{i}": i for i in range(500)})
        for i in range(100):
            kv.discard(f"k{i}")
        before = dict(kv)
        result = kv.rewarm(timeout=30)
        assert result["records"] == 600
        assert dict(kv) == before
        kv["after"] = 1  # the follower runs again after a rewarm
        assert kv["after"] == 1

    def test_codec_change_rebuilds_instead_of_misreading(self, make_kv: Any) -> None:
        kv = make_kv("a", codec="json")
        kv["k"] = "v"
        kv.close()
        reopened = make_kv("a", codec="str")
        assert "codec" in reopened.stats()["rebuilds"][0]
        assert reopened["k"] == '"v"', "rebuilt: the JSON bytes read back through the str codec"

    def test_recreated_topic_is_not_served_from_the_old_cache(
        self, make_kv: Any, admin: Any, topic: str
    ) -> None:
        kv = make_kv("a")
        kv.update({"old": 1, "both": "old"})
        kv.close()
        delete_topic(admin, topic)
        fresh = make_kv("b")
        fresh["both"] = "new"
        reopened = make_kv("a")
        assert dict(reopened) == {"both": "new"}
        assert "topic_id" in reopened.stats()["open_replay"]["rebuild_reason"]

    def test_a_topic_recreated_with_more_records_than_the_cache_read_is_rebuilt_at_open(
        self, make_kv: Any, admin: Any, topic: str
    ) -> None:
        """Same name and partitions, and the checkpoint is not past the new log end: only the topic id differs."""
        kv = make_kv("a")
        kv.update({"old": 1, "both": "old"})  # checkpoint 2
        kv.close()
        delete_topic(admin, topic)
        other = make_kv("b")
        other.update({"both": "new", "n1": 1, "n2": 2})  # end offset 3 of the new topic
        reopened = make_kv("a")
        assert "topic_id" in (reopened.open_replay["rebuild_reason"] or ""), reopened.open_replay
        assert dict(reopened) == {"both": "new", "n1": 1, "n2": 2}

    def test_sync_rebuilds_a_store_whose_topic_was_recreated_under_it(
        self, make_kv: Any, admin: Any, topic: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An open store meets a recreated topic that already holds more records than it has read.

        Positions stay inside the new log, so nothing but the topic id tells
        the topics apart: the store must rebuild, not read on from position 2
        of a log it never saw.
        """
        monkeypatch.setattr(replay_module, "CURRENT_MARK_SECONDS", 0.0)  # every sync() checks the log
        monkeypatch.setattr(replay_module, "MIN_MARK_SECONDS", 0.0)
        kv = make_kv("a", follow=False)
        kv.update({"old": 1, "both": "old"})
        delete_topic(admin, topic)
        other = make_kv("b")
        other.update({"both": "new", "n1": 1, "n2": 2})
        kv.sync(timeout=30)
        assert dict(kv) == {"both": "new", "n1": 1, "n2": 2}
        assert any("topic_id" in reason for reason in kv.stats()["rebuilds"]), kv.stats()["rebuilds"]

    def test_checkpoint_below_log_start_rebuilds(self, make_kv: Any, admin: Any, topic: str) -> None:
        """Records deleted past a closed cache's checkpoint force a full replay, not a skip."""
        kv = make_kv("a")
        kv.update({f"k{i}": i for i in range(10)})  # offsets 0-9: checkpoint 10
        kv.close()
        writer = make_kv("w")
        writer.update({f"k{i}": -i for i in range(5)})  # offsets 10-14
        writer.update({f"n{i}": i for i in range(5)})  # offsets 15-19

        def set_policy(policy: str) -> None:
            resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"cleanup.policy": policy})
            admin.alter_configs([resource])

        # DeleteRecords is refused on a compact-only topic; allow it for a moment.
        set_policy("compact,delete")
        admin.delete_records({TopicPartition(topic, 0): 12})  # log start 12 > checkpoint 10
        set_policy("compact")
        reopened = make_kv("a")
        assert "below the log start offset 12" in reopened.stats()["open_replay"]["rebuild_reason"]
        assert dict(reopened) == {"k2": -2, "k3": -3, "k4": -4, **{f"n{i}": i for i in range(5)}}


class TestTopicChecks:
    def test_topic_is_created_compacted(self, make_kv: Any, admin: Any, topic: str) -> None:
        make_kv(partitions=3)
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
        )
        assert configs["topic"][topic]["cleanup.policy"]["value"] == "compact"
        assert make_kv("b").stats()["log"]["partitions"] == 3

    def test_non_compacted_topic_is_refused_unless_allowed(
        self, admin: Any, make_kv: Any, topic: str
    ) -> None:
        admin.create_topics(
            {topic: {"num_partitions": 1, "replication_factor": 1, "configs": {"cleanup.policy": "delete"}}},
            wait_for_metadata=True,
        )
        with pytest.raises(TopicConfigError, match=r"cleanup.policy=delete.*compact"):
            make_kv()
        kv = make_kv("b", allow_non_compacted=True)
        kv["k"] = 1
        assert kv["k"] == 1

    def test_missing_topic_without_create_is_refused(self, make_kv: Any, topic: str) -> None:
        with pytest.raises(TopicConfigError, match="does not exist"):
            make_kv(create_topic=False)

    def test_oversize_record_is_refused_before_sending(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        kv = make_kv(topic_config={"max.message.bytes": "2000"})
        kv["small"] = "x" * 100
        with pytest.raises(RecordTooLargeError, match=r"max\.message\.bytes=2000"):
            kv["big"] = "x" * 5000
        assert "big" not in kv
        assert [r.key for r in topic_records(bootstrap, topic)] == [b"small"]


class TestBadInput:
    @pytest.mark.parametrize("key", [1, None, 2.5, ("t",), ["l"], bytearray(b"x")])
    def test_wrong_key_type_is_a_typeerror(self, make_kv: Any, key: Any) -> None:
        kv = make_kv()
        with pytest.raises(TypeError, match="keys must be str or bytes"):
            kv[key] = 1
        with pytest.raises(TypeError):
            kv[key]
        with pytest.raises(TypeError):
            kv.update({key: 1})

    @pytest.mark.parametrize("key", ["", b"", "x" * 512, "é" * 256, "\ud800"])
    def test_key_the_cache_cannot_hold_is_a_valueerror(self, make_kv: Any, key: Any) -> None:
        kv = make_kv()
        with pytest.raises(ValueError, match="key"):
            kv[key] = 1

    def test_longest_key_is_accepted(self, make_kv: Any) -> None:
        kv = make_kv()
        kv["x" * 511] = 1
        assert kv["x" * 511] == 1

    @pytest.mark.parametrize("value", [object(), {1, 2}, 2**70, {"nested": object()}])
    def test_unencodable_value_is_a_typeerror_and_writes_nothing(
        self, make_kv: Any, bootstrap: str, topic: str, value: Any
    ) -> None:
        kv = make_kv()
        kv["before"] = 1
        with pytest.raises(TypeError, match="msgpack"):
            kv["k"] = value
        with pytest.raises(TypeError):
            kv.update({"good": 1, "bad": value})
        assert dict(kv) == {"before": 1}
        assert [r.key for r in topic_records(bootstrap, topic)] == [b"before"], "nothing reached the log"


class TestLifecycle:
    def test_close_is_idempotent_and_use_after_close_is_clear(self, make_kv: Any) -> None:
        kv = make_kv()
        kv["k"] = 1
        kv.close()
        kv.close()
        assert kv.closed
        for use in (lambda: kv["k"], lambda: kv.__setitem__("k", 2), lambda: len(kv), kv.sync, kv.stats):
            with pytest.raises(ClosedError, match="closed"):
                use()
        assert isinstance(ClosedError("x"), ValueError)

    def test_context_manager_and_repr(self, tmp_path: Path, bootstrap: str, topic: str) -> None:
        with KVLog(tmp_path / "c", bootstrap_servers=bootstrap, topic=topic) as kv:
            kv["secret"] = "do not print me"
            text = repr(kv)
        assert kv.closed
        assert topic in text and "secret" not in text and "do not print me" not in text
        assert "closed" in repr(kv)

    def test_stats_shape(self, make_kv: Any) -> None:
        kv = make_kv(partitions=2)
        kv.update({f"k{i}": i for i in range(50)})
        stats = kv.stats()
        assert stats["entries"] == 50
        assert stats["checkpoint"] == stats["end_offsets"]
        assert sum(stats["checkpoint"].values()) == 50
        assert stats["total_lag"] == 0 and stats["following"] is True
        assert stats["bytes_on_disk"] > 0
        assert stats["log"]["kind"] == "kafka" and stats["log"]["partitions"] == 2


class TestBrokerDown:
    def test_unreachable_broker_at_open_names_the_address(self, tmp_path: Path) -> None:
        from devbroker import free_ports

        (port,) = free_ports(1)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port}") as info:
            KVLog(tmp_path / "c", bootstrap_servers=f"127.0.0.1:{port}", topic="t", timeout=2)
        assert isinstance(info.value, KVLogError) and isinstance(info.value, ConnectionError)
        assert time.monotonic() - started < 30, "the timeout bounds the wait"

    def test_reads_keep_working_and_writes_fail_cleanly_while_the_broker_is_down(
        self, tmp_path: Path
    ) -> None:
        from devbroker import DevBroker

        with DevBroker(tmp_path / "broker") as broker:
            kv = KVLog(tmp_path / "c", bootstrap_servers=broker.bootstrap_servers, topic="t", timeout=3)
            try:
                kv.update({"a": 1, "b": 2})
                broker.kill()
                assert kv["a"] == 1 and dict(kv) == {"a": 1, "b": 2}
                started = time.monotonic()
                with pytest.raises(BrokerUnavailableError, match=broker.bootstrap_servers):
                    kv["c"] = 3
                assert time.monotonic() - started < 30, "the write gave up within its bounded timeout"
                assert "c" not in kv and dict(kv) == {"a": 1, "b": 2}
                assert kv.stats()["end_offsets"] is None, "stats still answer, without the log's offsets"
            finally:
                kv.close()


class TestOwnWrites:
    """A write whose records are the next ones to replay puts them into the cache itself."""

    def test_a_caught_up_store_applies_its_own_writes_without_replaying_them(self, make_kv: Any) -> None:
        kv = make_kv("a", follow=False)
        for i in range(20):
            kv[f"k{i}"] = i
            assert kv[f"k{i}"] == i
        del kv["k3"]
        kv.update({f"b{i}": i for i in range(50)})
        stats = kv.stats()
        assert stats["records_applied_by_writers"] == 71
        assert stats["records_replayed"] == 0  # nothing was fetched back
        assert stats["checkpoint"] == stats["end_offsets"] == {0: 71}

    def test_records_of_another_writer_in_between_are_replayed_first(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        kv = make_kv("a", follow=False)
        other = make_kv("b", follow=False)
        kv["mine"] = 1
        other["theirs"] = 2  # offset 1: not in kv's cache yet
        kv["mine"] = 3  # offset 2 is not the next record of kv's cache: replay applies 1 and 2
        assert dict(kv) == {"mine": 3, "theirs": 2}
        assert kv.stats()["records_applied_by_writers"] == 1
        assert kv.stats()["records_replayed"] == 2
        assert dict(kv) == {k.decode(): v for k, v in _fold(topic_records(bootstrap, topic)).items()}

    def test_the_follower_reads_on_past_own_writes_and_reads_never_go_back(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        """Writes racing the follower, with a second writer in between: values and the checkpoint only move forward."""
        import threading

        kv = make_kv("a")
        other = make_kv("b", follow=False)
        stop = threading.Event()
        problems: list[str] = []

        def check_monotonic() -> None:
            last, applied = -1, 0
            while not stop.is_set():
                value = kv.get("counter", -1)
                if value < last:
                    problems.append(f"counter went back from {last} to {value}")
                    return
                last = value
                position = kv.stats()["checkpoint"].get(0, 0)
                if position < applied:
                    problems.append(f"the checkpoint went back from {applied} to {position}")
                    return
                applied = position

        checker = threading.Thread(target=check_monotonic)
        checker.start()
        try:
            for i in range(300):
                kv["counter"] = i
                assert kv["counter"] == i  # read-your-writes
                if i % 7 == 0:
                    other[f"other{i}"] = i
        finally:
            stop.set()
            checker.join()
        assert not problems, problems
        kv.sync(timeout=20)
        folded = {k.decode(): v for k, v in _fold(topic_records(bootstrap, topic)).items()}
        assert dict(kv) == folded
        stats = kv.stats()
        assert stats["records_applied_by_writers"] > 0
        assert stats["checkpoint"] == stats["end_offsets"]


def _fold(records: Any) -> dict[bytes, Any]:
    import msgpack

    state: dict[bytes, Any] = {}
    for record in records:
        if record.value is None:
            state.pop(record.key, None)
        else:
            state[record.key] = msgpack.unpackb(record.value)
    return state
