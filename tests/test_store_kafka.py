"""KVLog over a real Kafka broker: the mapping, read-your-writes, following, restart and rebuild."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType

from kvlog import (
    BrokerUnavailableError,
    ClosedError,
    Codec,
    KVLog,
    KVLogError,
    RecordTooLargeError,
    TopicConfigError,
)
from kvlog import replay as replay_module

pytestmark = pytest.mark.kafka


def topic_records(bootstrap: str, topic: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) physically in the topic, read with a plain consumer."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        out: list[tuple[bytes, bytes | None]] = []
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, "could not read the topic to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                out.extend((r.key, r.value) for r in batch)
        return out
    finally:
        consumer.close()


class TestMapping:
    def test_put_get_contains_len_iter(self, make_kv: Any) -> None:
        """The README example: a write is readable at once, keys iterate in sorted order."""
        kv = make_kv()
        kv["order:42"] = {"status": "paid", "total": 12.5}
        kv["order:7"] = {"status": "new"}
        kv[b"raw"] = [1, 2, 3]
        assert kv["order:42"] == {"status": "paid", "total": 12.5}
        assert "order:42" in kv and "order:43" not in kv
        assert kv.get("missing", "dflt") == "dflt"
        assert len(kv) == 3
        assert list(kv) == ["order:42", "order:7", "raw"]
        assert kv[b"order:7"] == kv["order:7"], "str keys are their UTF-8 bytes"

    def test_missing_key_raises_keyerror_with_the_key(self, make_kv: Any) -> None:
        kv = make_kv()
        with pytest.raises(KeyError) as info:
            kv["nope"]
        assert info.value.args == ("nope",)
        with pytest.raises(KeyError):
            del kv["nope"]

    def test_none_is_a_value_and_del_writes_a_tombstone(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        kv = make_kv()
        kv["a"] = None
        assert "a" in kv and kv["a"] is None
        del kv["a"]
        assert "a" not in kv
        assert topic_records(bootstrap, topic) == [(b"a", b"\xc0"), (b"a", None)]

    def test_update_is_one_batch_and_visible_when_it_returns(self, make_kv: Any) -> None:
        kv = make_kv()
        kv.update({"a": 1, "b": 2}, c=3)
        kv.update([("d", 4)])
        assert dict(kv) == {"a": 1, "b": 2, "c": 3, "d": 4}

    def test_scan_prefix_start_stop(self, make_kv: Any) -> None:
        kv = make_kv()
        kv.update({f"order:{i:03d}": i for i in range(20)} | {"user:1": "u", "a": 0})
        assert [k for k, _ in kv.scan(prefix="order:01")] == [f"order:{i:03d}" for i in range(10, 20)]
        assert list(kv.scan(start="order:018")) == [("order:018", 18), ("order:019", 19), ("user:1", "u")]
        assert list(kv.scan(stop="order:001")) == [("a", 0), ("order:000", 0)]
        assert list(kv.scan(prefix="order:", start="order:005", stop="order:007")) == [
            ("order:005", 5),
            ("order:006", 6),
        ]
        assert list(kv.scan(prefix="zzz")) == []

    def test_iteration_spans_many_chunks_in_order(self, make_kv: Any) -> None:
        """Iteration reads the cache in chunks; no key is lost or repeated across chunk edges."""
        kv = make_kv()
        kv.update({f"k{i:05d}": i for i in range(2000)})
        assert list(kv) == [f"k{i:05d}" for i in range(2000)]
        assert [v for _, v in kv.scan()] == list(range(2000))

    def test_bytes_key_type(self, make_kv: Any) -> None:
        kv = make_kv(key_type=bytes)
        kv["é"] = 1
        assert list(kv) == ["é".encode()]

    def test_clear_and_popitem_go_through_the_log(self, make_kv: Any) -> None:
        kv = make_kv()
        kv.update({"a": 1, "b": 2, "c": 3})
        assert kv.pop("a") == 1
        kv.clear()
        assert len(kv) == 0
        assert len(make_kv("other")) == 0, "a fresh replay sees the tombstones"

    @pytest.mark.parametrize(
        ("codec", "value"),
        [("json", {"a": [1, 2.5, None]}), ("str", "héllo"), ("bytes", b"\x00\xff")],
    )
    def test_builtin_codecs_round_trip(self, make_kv: Any, codec: str, value: Any) -> None:
        kv = make_kv(codec=codec)
        kv["k"] = value
        assert kv["k"] == value
        assert make_kv("fresh", codec=codec)["k"] == value

    def test_user_codec(self, make_kv: Any) -> None:
        upper = Codec("upper", lambda v: v.upper().encode(), lambda b: b.decode().lower())
        kv = make_kv(codec=upper)
        kv["k"] = "abc"
        assert kv["k"] == "abc"


class TestFollowing:
    def test_foreign_producer_record_appears_without_any_call(
        self, make_kv: Any, bootstrap: str, topic: str
    ) -> None:
        """A record from a plain Kafka producer (default partitioner) reaches the cache by itself."""
        kv = make_kv(partitions=3)
        producer = KafkaProducer(bootstrap_servers=bootstrap)
        try:
            producer.send(topic, key=b"foreign", value=b"\xa5hello").get(timeout=10)
            producer.send(topic, key=b"gone", value=b"\x01").get(timeout=10)
            producer.send(topic, key=b"gone", value=None).get(timeout=10)
        finally:
            producer.close()
        wait_until(lambda: kv.get("foreign") == "hello", timeout=20, what="the follower to apply the record")
        kv.sync(timeout=10)
        assert "gone" not in kv

    def test_other_instance_writes_become_visible(self, make_kv: Any) -> None:
        a, b = make_kv("a", partitions=2), make_kv("b")
        a["x"] = 1
        b["y"] = 2
        wait_until(lambda: a.get("y") == 2 and b.get("x") == 1, timeout=20, what="cross-instance visibility")

    def test_without_follower_the_cache_moves_only_on_sync(self, make_kv: Any) -> None:
        writer, reader = make_kv("w"), make_kv("r", follow=False)
        writer["k"] = "v"
        assert "k" not in reader, "follow=False: nothing applies records in the background"
        assert reader.stats()["total_lag"] == 1
        reader.sync(timeout=10)
        assert reader["k"] == "v"
        reader["own"] = 1  # its own writes are applied before they return
        assert reader["own"] == 1


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
        assert [k for k, _ in topic_records(bootstrap, topic)] == [b"small"]


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
        assert [k for k, _ in topic_records(bootstrap, topic)] == [b"before"], "nothing reached the log"


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
        from kvlog.devbroker import _free_ports

        (port,) = _free_ports(1)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError, match=f"127.0.0.1:{port}") as info:
            KVLog(tmp_path / "c", bootstrap_servers=f"127.0.0.1:{port}", topic="t", timeout=2)
        assert isinstance(info.value, KVLogError) and isinstance(info.value, ConnectionError)
        assert time.monotonic() - started < 30, "the timeout bounds the wait"

    def test_reads_keep_working_and_writes_fail_cleanly_while_the_broker_is_down(
        self, tmp_path: Path
    ) -> None:
        from kvlog.devbroker import DevBroker

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
