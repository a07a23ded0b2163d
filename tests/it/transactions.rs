//! Topics written by transactional producers: only committed records land
//! (librdkafka reads `read_committed`), aborted ones never, and the
//! transaction markers, which take offsets no record has, leave no false lag:
//! an idle partition's commit reaches its end.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::common::*;

const TRANSACTIONS: u64 = 30;
const PER_TRANSACTION: u64 = 20;

/// Writes `TRANSACTIONS` transactions of `PER_TRANSACTION` records over two
/// partitions, aborting every third; returns the ids that were committed.
fn produce_transactions(topic: &str) -> Vec<u64> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("tx"))
        .set("linger.ms", "5")
        .create()
        .expect("transactional producer");
    let t = Duration::from_secs(30);
    producer.init_transactions(t).expect("init_transactions");
    let mut committed = Vec::new();
    for tx in 0..TRANSACTIONS {
        producer.begin_transaction().expect("begin_transaction");
        for i in 0..PER_TRANSACTION {
            let id = tx * PER_TRANSACTION + i;
            let p = (id % 2) as i32;
            let value = String::from_utf8(simple_record(id, p)).expect("utf8");
            producer
                .send(
                    BaseRecord::<(), str>::to(topic)
                        .partition(p)
                        .payload(&value),
                )
                .map_err(|(e, _)| e)
                .expect("send");
            producer.poll(Duration::ZERO);
        }
        // Written to the log before the abort: the aborted records are
        // there for a reader to skip.
        producer.flush(t).expect("flush");
        if tx % 3 == 2 {
            producer.abort_transaction(t).expect("abort_transaction");
        } else {
            producer.commit_transaction(t).expect("commit_transaction");
            committed.extend(tx * PER_TRANSACTION..(tx + 1) * PER_TRANSACTION);
        }
    }
    committed
}

fn end_offsets(topic: &str) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("consumer");
    (0..2)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

fn only_committed_records_land_and_the_markers_leave_no_lag(delivery: &str) {
    let (db, topic, group, mut cfg) =
        simple_setup(&format!("tx_{}", delivery.replace('-', "_")), 2, "");
    cfg.extra = format!("delivery = \"{delivery}\"");
    if delivery == "exactly-once" {
        ch(&format!(
            "ALTER TABLE {db}.t MODIFY SETTING non_replicated_deduplication_window = 1000"
        ));
        cfg.extra
            .push_str(&format!("\n[exactly_once]\nstate_table = \"{db}.state\"\n"));
    }
    let committed_ids = produce_transactions(&topic);
    let ends = end_offsets(&topic);
    let bridge = Bridge::start(&cfg, &test_dir(&db));
    let n = committed_ids.len() as u64;
    let landed = wait_until(Duration::from_secs(60), || {
        ch_u64(&format!("SELECT count() FROM {db}.t")) >= n
    });
    assert!(
        landed,
        "committed records missing; log:\n{}",
        bridge.log_text()
    );
    // Every committed record once, no aborted one.
    let aborted = ch_u64(&format!(
        "SELECT count() FROM {db}.t WHERE intDiv(id, {PER_TRANSACTION}) % 3 = 2"
    ));
    assert_eq!(aborted, 0, "aborted records landed");
    assert_eq!(ch_u64(&format!("SELECT uniqExact(id) FROM {db}.t")), n);
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), n);
    // The last offset of each partition is a commit marker: the commit must
    // reach the end, or the lag stays 1 and the partition looks stalled.
    let at_end = wait_until(Duration::from_secs(20), || {
        committed(&group, &topic, 2) == ends
    });
    assert!(
        at_end,
        "committed {:?}, ends {ends:?}; log:\n{}",
        committed(&group, &topic, 2),
        bridge.log_text()
    );
    let no_lag = wait_until(Duration::from_secs(20), || {
        (0..2).all(|p| bridge.metric("chbridge_consumer_lag", &format!("partition=\"{p}\"")) == 0.0)
    });
    assert!(no_lag, "the lag metric stayed above 0");
    drop(bridge);
    drop_database(&db);
}

#[test]
fn at_least_once_reads_only_committed_transactions_and_commits_past_their_markers() {
    only_committed_records_land_and_the_markers_leave_no_lag("at-least-once");
}

#[test]
fn exactly_once_reads_only_committed_transactions_and_commits_past_their_markers() {
    only_committed_records_land_and_the_markers_leave_no_lag("exactly-once");
}
