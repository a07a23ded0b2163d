//! Integration tests against the real local stack (`make test` starts it):
//! a real ClickHouse server and a real Kafka-protocol broker on 127.0.0.1, and
//! chbridge run as a real process. Every test uses its own topics, group and
//! database, and asserts on the rows, counts and committed offsets.

mod common;

mod bad_records;
mod check;
mod clickhouse_outage;
mod dead_letters;
mod drift;
mod end_to_end;
mod exactly_once;
mod formats;
mod group_protocols;
mod https;
mod kafka_security;
mod prometheus;
mod reload;
mod restarts;
mod status;
mod transactions;
mod types_roundtrip;
