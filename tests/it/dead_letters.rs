//! Dead letters: records that cannot be decoded, and rows ClickHouse refuses
//! (found by splitting the refused batch), go to the dead-letter topic with
//! their origin; every other row lands.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use rdkafka::message::{Headers, Message};

use crate::common::*;

fn header(m: &rdkafka::message::OwnedMessage, name: &str) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == name))
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).to_string())
        .unwrap_or_default()
}

#[test]
fn bad_records_and_refused_rows_go_to_the_dead_letter_topic_and_good_rows_land() {
    let db = unique("it_dlq");
    let topic = unique("dlq_src");
    let dlq = unique("dlq");
    let group = unique("g_dlq");
    create_database(&db);
    ch(&format!(
        "CREATE TABLE {db}.t (id UInt64, p UInt8, payload String, \
         CONSTRAINT no_rejects CHECK payload != 'reject me') ENGINE = MergeTree ORDER BY id \
         SETTINGS non_replicated_deduplication_window = 100"
    ));
    create_topic(&topic, 2);
    create_topic(&dlq, 1);
    let cfg = BridgeConfig::new(
        &group,
        &db,
        &format!(
            "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\non_error = \"dead-letter\"\n\
             dead_letter_topic = \"{dlq}\"\n"
        ),
    );
    let prod = TestProducer::new();
    let good = 3_000u64;
    let mut bad: HashMap<u64, (&str, Vec<u8>)> = HashMap::new();
    for id in 0..good {
        let p = (id % 2) as i32;
        prod.send(&topic, Some(p), id, &simple_record(id, p));
        let bad_id = 1_000_000 + id;
        if id % 100 == 7 {
            let v = b"{\"id\": 1, \"p\": 0".to_vec(); // decoding fails
            prod.send(&topic, Some(p), bad_id, &v);
            bad.insert(bad_id, ("decode", v));
        } else if id % 100 == 57 {
            // Valid for the decoder; the table's CHECK refuses it.
            let v = format!(r#"{{"id":{bad_id},"p":{p},"payload":"reject me"}}"#).into_bytes();
            prod.send(&topic, Some(p), bad_id, &v);
            bad.insert(bad_id, ("data", v));
        }
    }
    prod.flush();
    let placement = prod.placement();
    let dir = test_dir(&db);
    let bridge = Bridge::start(&cfg, &dir);
    assert!(
        wait_until(Duration::from_secs(60), || ch_u64(&format!(
            "SELECT count() FROM {db}.t"
        )) >= good),
        "good rows did not land; log:\n{}",
        bridge.log_text()
    );
    let letters = read_topic(&dlq, bad.len(), Duration::from_secs(30));
    assert_eq!(ch_u64(&format!("SELECT count() FROM {db}.t")), good);
    assert_eq!(
        ch_u64(&format!(
            "SELECT uniqExact(id) FROM {db}.t WHERE id < {good}"
        )),
        good
    );
    // Each bad record exactly once, unchanged, naming where it came from and why.
    let mut seen = BTreeSet::new();
    for m in &letters {
        let (p, o): (i32, i64) = (
            header(m, "chbridge.origin.partition").parse().unwrap(),
            header(m, "chbridge.origin.offset").parse().unwrap(),
        );
        let (&id, _) = placement
            .iter()
            .find(|(_, &at)| at == (p, o))
            .expect("a dead letter of a produced record");
        let (kind, value) = &bad[&id];
        assert_eq!(m.payload().unwrap(), &value[..], "value of {id}");
        assert_eq!(header(m, "chbridge.origin.topic"), topic);
        assert_eq!(header(m, "chbridge.table"), format!("{db}.t"));
        let class = header(m, "chbridge.error.class");
        let message = header(m, "chbridge.error.message");
        if *kind == "data" {
            assert_eq!(class, "data", "{message}");
            assert!(message.contains("VIOLATED_CONSTRAINT"), "{message}");
        } else {
            assert_ne!(class, "data", "{message}");
        }
        assert!(seen.insert(id), "{id} dead-lettered twice");
    }
    assert_eq!(seen.len(), bad.len());
    // Offsets of dead letters are committed like the rest.
    let ends: Vec<i64> = (0..2)
        .map(|p| placement.values().filter(|(pp, _)| *pp == p).count() as i64)
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || committed(&group, &topic, 2)
            == ends),
        "committed {:?}, ends {ends:?}",
        committed(&group, &topic, 2)
    );
    assert!(bridge.metric("chbridge_bisect_inserts_total", "") > 0.0);
    assert_eq!(
        bridge.metric("chbridge_records_failed_total", "reason=\"rejected\""),
        bad.values().filter(|(k, _)| *k == "data").count() as f64
    );
    drop(bridge);

    // The fix: the table accepts those rows now. Replaying inserts the
    // refused rows; the undecodable records still fail and are listed.
    ch(&format!("ALTER TABLE {db}.t DROP CONSTRAINT no_rejects"));
    let refused = bad.values().filter(|(k, _)| *k == "data").count() as u64;
    let path = write_config(&cfg, &dir);
    let replay = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_chbridge"))
            .args(["dlq", "replay", "--route", "0", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = replay();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains(&format!(
            "read {} dead letters, inserted {refused} rows, 0 belong to other routes, {} still fail",
            bad.len(),
            bad.len() as u64 - refused
        )),
        "{text}"
    );
    let rows = || ch_u64(&format!("SELECT count() FROM {db}.t"));
    assert_eq!(rows(), good + refused);
    assert_eq!(
        ch_u64(&format!(
            "SELECT count() FROM {db}.t WHERE payload = 'reject me'"
        )),
        refused
    );
    // Repeating the replay inserts nothing twice (deduplication tokens).
    let again = replay();
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(rows(), good + refused);
    drop_database(&db);
}

/// Item 12 of the delivery review: two routes into one table, each with its
/// own dead-letter topic. Their replays must not take each other for
/// duplicates (the token named neither the dead-letter topic nor the group),
/// and a replayed record keeps its key, timestamp and headers (they were not
/// passed to the decoder).
#[test]
fn replays_of_two_routes_into_one_table_both_land_with_the_records_metadata() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let db = unique("it_dlq2");
    let group = unique("g_dlq2");
    create_database(&db);
    ch(&format!(
        "CREATE TABLE {db}.t (id UInt64, src String, k String, trace String, \
         ts DateTime64(3, 'UTC'), payload String, \
         CONSTRAINT no_rejects CHECK payload != 'reject me') ENGINE = MergeTree ORDER BY id \
         SETTINGS non_replicated_deduplication_window = 100"
    ));
    let producer: BaseProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    const N: u64 = 400;
    let mut routes = String::new();
    let mut topics = Vec::new();
    for (r, name) in ["a", "b"].iter().enumerate() {
        let topic = unique(&format!("dlq2_{name}"));
        let dlq = unique(&format!("dlq2_{name}_dead"));
        create_topic(&topic, 1);
        create_topic(&dlq, 1);
        for i in 0..N {
            let id = r as u64 * 1_000_000 + i;
            // Every 20th row is refused by the table until the fix.
            let payload = if i % 20 == 3 { "reject me" } else { "fine" };
            let value = format!(r#"{{"id":{id},"payload":"{payload}"}}"#);
            let (key, trace) = (format!("k{id}"), format!("t{id}"));
            let rec = BaseRecord::to(&topic)
                .key(key.as_bytes())
                .payload(value.as_bytes())
                .headers(OwnedHeaders::new().insert(Header {
                    key: "trace-id",
                    value: Some(trace.as_bytes()),
                }))
                .timestamp(1_700_000_000_000 + id as i64);
            producer.send(rec).map_err(|(e, _)| e).expect("send");
            producer.poll(Duration::ZERO);
        }
        routes.push_str(&format!(
            "[[routes]]\ntopics = [\"{topic}\"]\ntable = \"t\"\non_error = \"dead-letter\"\n\
             dead_letter_topic = \"{dlq}\"\n[routes.columns]\nsrc = {{ const = \"{name}\" }}\n\
             k = {{ meta = \"key\" }}\ntrace = {{ header = \"trace-id\" }}\nts = {{ meta = \"timestamp\" }}\n\n"
        ));
        topics.push((topic, dlq));
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
    let cfg = BridgeConfig::new(&group, &db, &routes);
    let dir = test_dir(&db);
    let bridge = Bridge::start(&cfg, &dir);
    let refused = N / 20;
    let landed = 2 * (N - refused);
    assert!(
        wait_until(Duration::from_secs(60), || ch_u64(&format!(
            "SELECT count() FROM {db}.t"
        )) >= landed),
        "good rows did not land; log:\n{}",
        bridge.log_text()
    );
    for (_, dlq) in &topics {
        read_topic(dlq, refused as usize, Duration::from_secs(30));
    }
    drop(bridge);
    ch(&format!("ALTER TABLE {db}.t DROP CONSTRAINT no_rejects"));
    let path = write_config(&cfg, &dir);
    for route in ["0", "1"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chbridge"))
            .args(["dlq", "replay", "--route", route, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "route {route}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!(
                "read {refused} dead letters, inserted {refused} rows"
            )),
            "route {route}: {text}"
        );
    }
    assert_eq!(
        ch_u64(&format!("SELECT count() FROM {db}.t")),
        2 * N,
        "the second route's replay was dropped as a duplicate of the first's"
    );
    // The replayed rows carry their records' key, header and timestamp.
    assert_eq!(
        ch_u64(&format!(
            "SELECT countIf(k = concat('k', toString(id)) AND trace = concat('t', toString(id)) \
             AND toUnixTimestamp64Milli(ts) = 1700000000000 + id \
             AND src = if(id >= 1000000, 'b', 'a')) FROM {db}.t WHERE payload = 'reject me'"
        )),
        2 * refused
    );
    drop_database(&db);
}
