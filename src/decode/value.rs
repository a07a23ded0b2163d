//! A decoded value of a binary format (Avro, Protobuf) or of Kafka metadata,
//! before it is converted to a column's type.
//!
//! JSON does not come through here: it converts while parsing (json.rs). The
//! formats that hand over a whole decoded record build this tree instead, and
//! [`write_value`] converts it with the same scalar conversions JSON uses
//! (schema/encode.rs), so a value converts the same way whatever format it came in.

use std::borrow::Cow;

/// One decoded value. Variants carry the meaning the format gave the value
/// (a decimal's scale, a timestamp's unit), never a lossy approximation.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    /// Any integer the format carries (Avro int/long, Protobuf (s|u)int32/64, fixed*).
    Int(i128),
    Float(f64),
    /// Text: converts to strings as is, to other types as ClickHouse parses text.
    Str(Cow<'a, str>),
    /// Binary: String and FixedString take the bytes; UUID and IPv6 take 16 bytes.
    Bytes(Cow<'a, [u8]>),
    /// An exact decimal: `unscaled * 10^-scale`. Big-endian two's complement
    /// bytes of any length (Avro's decimal), so Decimal256 keeps every digit.
    Decimal {
        unscaled: Cow<'a, [u8]>,
        scale: u32,
    },
    /// A point in time as nanoseconds since 1970-01-01 UTC (Avro timestamp-*,
    /// Protobuf Timestamp, the Kafka timestamp).
    Timestamp(i128),
    /// Days since 1970-01-01 (Avro date).
    Date(i32),
    /// Time of day (or a duration) in nanoseconds (Avro time-millis/micros).
    Time(i64),
    /// An enum symbol with its number when the format has one.
    Enum {
        name: Cow<'a, str>,
        number: Option<i64>,
    },
    /// Avro array, Protobuf repeated field.
    Array(Vec<Value<'a>>),
    /// Avro map, Protobuf map field: keys in the order decoded.
    Map(Vec<(Value<'a>, Value<'a>)>),
    /// A nested record (Avro record, Protobuf message): fields by name, in order.
    Record(Vec<(Cow<'a, str>, Value<'a>)>),
}
