//! chbridge: a Kafka-to-ClickHouse consumer bridge that commits a Kafka offset
//! only after ClickHouse has acknowledged every row below it.
//!
//! The modules follow a record: `kafka` (consumer, callbacks, offsets) ->
//! `decode` (one file per format) -> `schema` (tables, types, row encoding) ->
//! `pipeline` (routing, batching, commit) -> `sink` (inserts, retries), with
//! `exactly_once` (batch ranges recorded in ClickHouse) and
//! `config`, `observability` and `check` beside them.

// Input and the network reach almost all of this crate: no unwrap/expect outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod check;
pub mod config;
pub mod decode;
pub mod exactly_once;
pub mod kafka;
pub mod observability;
pub mod pipeline;
pub mod replay;
pub mod schema;
pub mod sink;
pub mod status;
