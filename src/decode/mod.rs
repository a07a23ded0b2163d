//! Record decoding: from a Kafka message value to one encoded row of a target
//! table. One file per input format; each implements [`Decoder`].

pub mod json;
pub mod value;

use std::fmt;

use serde::Deserialize;

use crate::schema::TableSchema;

/// What to do with a field that matches no column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownFields {
    /// Drop it silently (the default: producers may add fields before the table has them).
    #[default]
    Ignore,
    /// Treat the record as bad.
    Error,
}

/// Why one record could not become a row. The pipeline adds where it came from
/// (topic, partition, offset) and which table it was meant for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub kind: RecordErrorKind,
    /// The column the failing value was meant for, when one is known.
    pub column: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordErrorKind {
    /// The message has no value (a tombstone) or an empty one.
    Empty,
    /// Not valid input of the format (e.g. broken JSON, not an object).
    Malformed,
    /// A value does not fit its column's type.
    Conversion,
    /// A field that matches no column, with `unknown_fields = "error"`.
    UnknownField,
    /// Over one of the route's `limits` (size, nesting depth, array or string length).
    Limit,
    /// The record's schema does not fit the table, or names a schema that does
    /// not exist: a configuration problem, so the route stops whatever `on_error` says.
    Schema,
    /// The schema registry cannot be reached: nothing is wrong with the record,
    /// so the bridge stops without committing past it and is restarted.
    Unavailable,
}

impl RecordErrorKind {
    pub const ALL: [RecordErrorKind; 7] = [
        RecordErrorKind::Empty,
        RecordErrorKind::Malformed,
        RecordErrorKind::Conversion,
        RecordErrorKind::UnknownField,
        RecordErrorKind::Limit,
        RecordErrorKind::Schema,
        RecordErrorKind::Unavailable,
    ];

    /// Short stable name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordErrorKind::Empty => "empty",
            RecordErrorKind::Malformed => "malformed",
            RecordErrorKind::Conversion => "conversion",
            RecordErrorKind::UnknownField => "unknown_field",
            RecordErrorKind::Limit => "limit",
            RecordErrorKind::Schema => "schema",
            RecordErrorKind::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(c) => write!(f, "{} (column `{c}`): {}", self.kind.as_str(), self.message),
            None => write!(f, "{}: {}", self.kind.as_str(), self.message),
        }
    }
}

impl std::error::Error for RecordError {}

/// The formats that decode a whole record before mapping it (Avro, Protobuf):
/// a message value in, a [`value::Value::Record`] out. The mapping to columns
/// is shared (mapping.rs).
pub trait RecordReader: Send {
    fn read<'a>(&mut self, value: &'a [u8]) -> Result<value::Value<'a>, RecordError>;
}

/// Turns a message value into one row of the table it was built for.
pub trait Decoder: Send {
    /// Appends exactly one encoded row (RowBinaryWithDefaults, in the order of
    /// [`TableSchema::insert_columns`]) to `out`, or returns why the record
    /// cannot be a row, leaving `out` as it was.
    fn decode(&mut self, value: Option<&[u8]>, out: &mut Vec<u8>) -> Result<(), RecordError>;
}

/// The input formats a route can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    #[default]
    Json,
}

/// Builds the decoder of a route for its target table.
pub fn decoder_for(
    format: Format,
    table: &TableSchema,
    unknown: UnknownFields,
) -> Box<dyn Decoder> {
    match format {
        Format::Json => Box::new(json::JsonDecoder::new(table, unknown)),
    }
}
