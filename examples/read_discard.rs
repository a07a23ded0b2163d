//! The broker ceiling for `make bench`: a bare rdkafka consumer in a group
//! that reads records and discards them, with chbridge's fetch settings, so
//! that chbridge's rows/s can be compared with what the broker and librdkafka
//! deliver at all on the same machine.
//!
//! read_discard --brokers B --topic T --group G --count N
//! prints {"records": N, "bytes": B, "seconds": S}, S from the first record to
//! the Nth (the group join is not timed).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
    }
    None
}

fn main() {
    let (Some(brokers), Some(topic), Some(group), Some(count)) = (
        arg("--brokers"),
        arg("--topic"),
        arg("--group"),
        arg("--count").and_then(|c| c.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: read_discard --brokers B --topic T --group G --count N");
        std::process::exit(2);
    };
    // The settings chbridge's consumer uses (src/kafka/mod.rs) that matter
    // for fetching; nothing is committed.
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.queue.backoff.ms", "10")
        .set("queued.max.messages.kbytes", "32768")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "2000")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("read_discard: cannot create the consumer: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = consumer.subscribe(&[&topic]) {
        eprintln!("read_discard: cannot subscribe to {topic}: {e}");
        std::process::exit(1);
    }
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while records < count {
        if Instant::now() > deadline {
            eprintln!("read_discard: only {records} of {count} records in 10 minutes");
            std::process::exit(1);
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                records += 1;
                bytes += m.payload_len() as u64;
            }
            Some(Err(e)) => eprintln!("read_discard: {e}"),
            None => {}
        }
    }
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!("{{\"records\": {records}, \"bytes\": {bytes}, \"seconds\": {seconds:.3}}}");
}
