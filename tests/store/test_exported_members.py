"""The public names are a contract: adding or removing one is a deliberate change."""

import kvlog


def test_all_is_pinned_and_sorted() -> None:
    # One line per letter, so that a name added or removed shows in a diff.
    pinned = """
        BadRecordError BrokerUnavailableError
        CacheError ClosedError Codec CodecError
        KVLog KVLogError
        LocalLog LogCorruptError LogLockedError LogUnavailableError
        NotEnoughReplicasError
        RecordTooLargeError
        SyncTimeoutError
        TopicConfigError
        WriteError
    """.split()
    assert kvlog.__all__ == pinned
    assert kvlog.__all__ == sorted(kvlog.__all__)


def test_every_public_name_is_documented() -> None:
    for name in kvlog.__all__:
        member = getattr(kvlog, name)
        assert member.__module__.startswith("kvlog."), name
        assert member.__doc__, f"{name} has no docstring"


def test_public_methods_of_kvlog_are_documented() -> None:
    for name in ("sync", "rewarm", "stats", "scan", "close", "update", "get", "discard"):
        assert getattr(kvlog.KVLog, name).__doc__, name


def test_errors_share_the_root_and_their_builtin_meaning() -> None:
    for name in kvlog.__all__:
        member = getattr(kvlog, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, kvlog.KVLogError), name
    assert issubclass(kvlog.ClosedError, ValueError)
    assert issubclass(kvlog.BadRecordError, ValueError)
    assert issubclass(kvlog.SyncTimeoutError, TimeoutError)
    assert issubclass(kvlog.BrokerUnavailableError, ConnectionError)
    assert issubclass(kvlog.NotEnoughReplicasError, kvlog.LogUnavailableError)


def test_retriable_errors_say_so() -> None:
    """Transient conditions (broker down, replicas catching up, slow replay) are retriable; the rest not."""
    retriable = {
        "BrokerUnavailableError",
        "LogUnavailableError",
        "NotEnoughReplicasError",
        "SyncTimeoutError",
    }
    for name in kvlog.__all__:
        member = getattr(kvlog, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert member.retriable is (name in retriable), name
