"""Reading a topic's configuration from a broker that does not know the topic yet.

A broker asked for the configuration of a topic it has not heard of answers
with none at all, and no error; read as it is, that is the default
``cleanup.policy=delete``, and kvlog would refuse a compacted topic another
client had just created (on a cluster, some brokers learn of a new topic a
moment later than others). kvlog asks again until the configuration is there.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from kvlog.errors import TopicConfigError
from kvlog.log.kafka import KafkaLog

pytestmark = pytest.mark.kafka


def test_a_configuration_not_there_yet_is_waited_for(bootstrap: str, topic: str, admin: Any) -> None:
    from kafka.admin import NewTopic

    log = KafkaLog(bootstrap, topic, timeout=10.0)
    try:
        # The same log, asked about a topic that exists only once the poll is under way.
        log.topic = later = f"{topic}-later-{uuid.uuid4().hex[:6]}"
        asked = threading.Event()
        real = log._admin.describe_configs  # type: ignore[union-attr]

        def describe(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            asked.set()
            return result

        log._admin.describe_configs = describe  # type: ignore[union-attr]
        creator = threading.Thread(
            target=lambda: (
                asked.wait(10)
                and admin.create_topics([NewTopic(later, 1, 1, topic_configs={"cleanup.policy": "compact"})])
            )
        )
        creator.start()
        configs = log._describe_configs()
        creator.join(10)
        assert configs["cleanup.policy"]["value"] == "compact"
    finally:
        log.close()


def test_a_topic_no_broker_knows_is_refused_by_name(bootstrap: str, topic: str) -> None:
    log = KafkaLog(bootstrap, topic, timeout=1.0)
    try:
        log.topic = f"{topic}-never"
        with pytest.raises(TopicConfigError, match="reported the configuration of topic"):
            log._describe_configs()
    finally:
        log.close()
