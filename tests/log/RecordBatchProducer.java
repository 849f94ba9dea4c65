// Writes record batches with the Java client, for tests/log/test_recordbatch.py.
//
// Usage: java RecordBatchProducer <bootstrap> <topic> codecs|transactions
//
// codecs: for each compression type, one producer writes 40 records to
// partition 0 in batches of several records: up to three headers a record (some
// with a null value), null keys, tombstones, one value of 300 KB.
//
// transactions: two transactional producers (gzip and uncompressed; gzip
// needs no library on the reading side) write to partition 0: a
// committed transaction; then, interleaved, one producer's transaction that
// is aborted and the other's that is committed (so aborted and committed
// batches alternate before their markers); then a committed one; and last an
// aborted one, so that the partition ends with aborted data and its marker.
// Each record's value names its fate ("committed" or "aborted").

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class RecordBatchProducer {
    static byte[] bytes(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    static Properties settings(String bootstrap, String compression) {
        Properties props = new Properties();
        props.put("bootstrap.servers", bootstrap);
        props.put("key.serializer", ByteArraySerializer.class.getName());
        props.put("value.serializer", ByteArraySerializer.class.getName());
        props.put("acks", "all");
        props.put("compression.type", compression);
        // Several records per batch: sends are flushed in groups below.
        props.put("linger.ms", "1000");
        props.put("batch.size", "1048576");
        props.put("max.request.size", "2097152");
        return props;
    }

    static List<Header> headers(int i) {
        List<Header> headers = new ArrayList<>();
        for (int h = 0; h < i % 3; h++) {
            headers.add(new RecordHeader("header-" + h, bytes("value " + i + "/" + h)));
        }
        if (i % 5 == 0) {
            headers.add(new RecordHeader("null-valued", null));
        }
        return headers;
    }

    static void codecs(String bootstrap, String topic) throws Exception {
        for (String codec : new String[] {"none", "gzip", "snappy", "lz4", "zstd"}) {
            try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(settings(bootstrap, codec))) {
                for (int i = 0; i < 40; i++) {
                    byte[] key = i % 11 == 7 ? null : bytes(codec + ":key:" + (i % 15));
                    byte[] value;
                    if (i % 9 == 4) {
                        value = null;
                    } else if (i == 20) {
                        value = bytes(codec + ":large:" + "x".repeat(300 * 1024));
                    } else {
                        value = bytes(codec + ":value:" + i + ":" + "v".repeat(i * 7));
                    }
                    producer.send(new ProducerRecord<>(topic, 0, key, value, headers(i)));
                    if (i % 8 == 7) {
                        producer.flush();
                    }
                }
                producer.flush();
            }
        }
    }

    static void send(KafkaProducer<byte[], byte[]> producer, String topic, String fate, String who, int count) {
        for (int i = 0; i < count; i++) {
            String name = who + ":" + i;
            producer.send(new ProducerRecord<>(topic, 0, bytes("txn:" + name), bytes(fate + ":" + name), headers(i)));
        }
        producer.flush();
    }

    static void transactions(String bootstrap, String topic) throws Exception {
        Properties a = settings(bootstrap, "gzip");
        a.put("transactional.id", topic + "-a");
        Properties b = settings(bootstrap, "none");
        b.put("transactional.id", topic + "-b");
        try (KafkaProducer<byte[], byte[]> first = new KafkaProducer<>(a);
                KafkaProducer<byte[], byte[]> second = new KafkaProducer<>(b)) {
            first.initTransactions();
            second.initTransactions();

            first.beginTransaction();
            send(first, topic, "committed", "a1", 5);
            first.commitTransaction();

            first.beginTransaction();
            second.beginTransaction();
            send(first, topic, "aborted", "a2", 3);
            send(second, topic, "committed", "b1", 3);
            send(first, topic, "aborted", "a2-more", 3);
            send(second, topic, "committed", "b1-more", 2);
            second.commitTransaction();
            first.abortTransaction();

            second.beginTransaction();
            send(second, topic, "committed", "b2", 4);
            second.commitTransaction();

            first.beginTransaction();
            send(first, topic, "aborted", "a3", 4);
            first.abortTransaction();
        }
    }

    public static void main(String[] args) throws Exception {
        if (args[2].equals("codecs")) {
            codecs(args[0], args[1]);
        } else {
            transactions(args[0], args[1]);
        }
    }
}
