"""Every kafka-python client a KafkaLog opens asks for its first topic metadata at once.

kafka-python 3 counts a client's bootstrap as a metadata refresh and then
waits its cluster's ``retry_backoff_ms`` (100 ms, a setting the client does
not pass down) before the next one, which is the first request that needs a
topic's metadata: a new store's first write waited for its producer's, its
first read from the topic for its reader's. kvlog shortens that backoff on
every client it makes; the producer keeps its cluster metadata where the
other clients do not, and was once missed.
"""

from __future__ import annotations

import pytest

from kvlog.log.kafka import _METADATA_BACKOFF_MS, KafkaLog, _cluster_config

pytestmark = pytest.mark.kafka


def test_every_client_a_kafka_log_opens_waits_the_short_metadata_backoff(bootstrap: str, topic: str) -> None:
    log = KafkaLog(bootstrap, topic)
    try:
        reader = log.open_reader(log.begin_offsets())
        # The producer a failed write makes in place of the last one.
        replacement, _ = log._new_producer(bootstrap_timeout=10.0)
        try:
            clients = {
                "admin client": log._admin,
                "producer": log._producer,
                "replacement producer": replacement,
                "offsets consumer": log._offsets_consumer,
                "reader": reader._consumer,
            }
            for name, client in clients.items():
                config = _cluster_config(client)
                assert isinstance(config, dict), f"the {name}'s cluster metadata config was not found"
                assert config["retry_backoff_ms"] == _METADATA_BACKOFF_MS, name
        finally:
            replacement.close(timeout=5)
            reader.close()
    finally:
        log.close()
