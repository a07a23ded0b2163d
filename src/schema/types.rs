//! ClickHouse column types, parsed from the `type` strings of `system.columns`.
//!
//! Only the structure the encoders need is kept; a type the encoders cannot
//! produce is kept as [`ColumnType::Unsupported`] with its original text so that
//! `chbridge check` can name it.

use std::fmt;

/// A ClickHouse data type as far as the RowBinary encoder is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Int128,
    UInt128,
    Int256,
    UInt256,
    /// Stored as the upper 16 bits of a Float32.
    BFloat16,
    Float32,
    Float64,
    /// `Decimal(P, S)`: an integer of 4, 8, 16 or 32 bytes (by P) scaled by 10^-S.
    Decimal {
        precision: u32,
        scale: u32,
    },
    Bool,
    String,
    FixedString(usize),
    Uuid,
    Date,
    Date32,
    /// `DateTime` or `DateTime('tz')`.
    DateTime {
        tz: Option<String>,
    },
    /// `DateTime64(precision)` or `DateTime64(precision, 'tz')`.
    DateTime64 {
        precision: u32,
        tz: Option<String>,
    },
    IPv4,
    /// 16 bytes in network order.
    IPv6,
    /// `Enum8` (wide = false) or `Enum16`: names and their numbers, as declared.
    Enum {
        wide: bool,
        values: Vec<(String, i16)>,
    },
    /// Seconds of a time of day or duration (Int32), or `Time64(p)` ticks (Int64).
    Time,
    Time64 {
        precision: u32,
    },
    /// `Variant(T1, ...)`: one discriminator byte (the index in this list, which
    /// is ClickHouse's sorted order) and the value; 255 is NULL.
    Variant(Vec<ColumnType>),
    /// A value with its type: the type's binary encoding, then the value.
    Dynamic,
    /// The `JSON` type, sent as JSON text (`input_format_binary_read_json_as_string`).
    Json,
    /// `IntervalSecond` .. `IntervalYear`: a count (Int64) of the named unit.
    Interval(String),
    /// `QBit(T, N)`: a vector of exactly N floats of type T, sent as an array.
    QBit(Box<ColumnType>, usize),
    Nullable(Box<ColumnType>),
    /// Encoded exactly as its inner type in RowBinary.
    LowCardinality(Box<ColumnType>),
    Array(Box<ColumnType>),
    Map(Box<ColumnType>, Box<ColumnType>),
    /// `Tuple(T1, T2)` or `Tuple(a T1, b T2)`: elements in order, with their
    /// names when the tuple is named.
    Tuple(Vec<(Option<String>, ColumnType)>),
    /// A type the encoders do not produce yet; the text is ClickHouse's.
    Unsupported(String),
}

impl ColumnType {
    /// Parses a type as ClickHouse prints it in `system.columns.type`.
    pub fn parse(text: &str) -> ColumnType {
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
        };
        match p.parse_type() {
            Some(ty) if p.at_end() => ty,
            _ => ColumnType::Unsupported(text.to_string()),
        }
    }

    /// True when the encoders can produce values of this type (recursively).
    pub fn is_supported(&self) -> bool {
        match self {
            ColumnType::Unsupported(_) => false,
            ColumnType::Nullable(t) | ColumnType::LowCardinality(t) | ColumnType::Array(t) => {
                t.is_supported()
            }
            ColumnType::Map(k, v) => k.is_supported() && v.is_supported(),
            ColumnType::Tuple(els) => !els.is_empty() && els.iter().all(|(_, t)| t.is_supported()),
            ColumnType::Variant(vs) => !vs.is_empty() && vs.iter().all(|t| t.is_supported()),
            _ => true,
        }
    }

    /// True when this type or one inside it satisfies `f`.
    pub fn contains(&self, f: &dyn Fn(&ColumnType) -> bool) -> bool {
        f(self)
            || match self {
                ColumnType::Nullable(t) | ColumnType::LowCardinality(t) | ColumnType::Array(t) => {
                    t.contains(f)
                }
                ColumnType::Map(k, v) => k.contains(f) || v.contains(f),
                ColumnType::Tuple(els) => els.iter().any(|(_, t)| t.contains(f)),
                ColumnType::Variant(vs) => vs.iter().any(|t| t.contains(f)),
                ColumnType::QBit(t, _) => t.contains(f),
                _ => false,
            }
    }

    /// (U)Int8..256: values convert from integers and numeric strings.
    pub fn is_integer(&self) -> bool {
        matches!(
            self,
            ColumnType::Int8
                | ColumnType::Int16
                | ColumnType::Int32
                | ColumnType::Int64
                | ColumnType::UInt8
                | ColumnType::UInt16
                | ColumnType::UInt32
                | ColumnType::UInt64
                | ColumnType::Int128
                | ColumnType::UInt128
                | ColumnType::Int256
                | ColumnType::UInt256
                | ColumnType::Interval(_)
        )
    }

    /// Integers, floats and Bool: the types `encode::write_int` and
    /// `encode::write_numeric_str` write.
    pub fn is_numeric(&self) -> bool {
        self.is_integer()
            || matches!(
                self,
                ColumnType::Float32 | ColumnType::Float64 | ColumnType::BFloat16 | ColumnType::Bool
            )
    }

    /// Scalar types a number converts to (see `encode::write_integer`).
    pub fn accepts_number(&self) -> bool {
        self.is_numeric()
            || matches!(
                self,
                ColumnType::DateTime { .. }
                    | ColumnType::DateTime64 { .. }
                    | ColumnType::Date
                    | ColumnType::Date32
                    | ColumnType::Enum { .. }
                    | ColumnType::Time
                    | ColumnType::Time64 { .. }
                    | ColumnType::Decimal { .. }
            )
    }

    /// Scalar types text converts to (see `encode::write_str`).
    pub fn accepts_text(&self) -> bool {
        self.accepts_number()
            || matches!(
                self,
                ColumnType::String
                    | ColumnType::FixedString(_)
                    | ColumnType::Uuid
                    | ColumnType::IPv4
                    | ColumnType::IPv6
            )
    }

    /// Types whose JSON numbers must be read from their exact text: an f64 or
    /// a 64-bit integer would lose digits.
    pub fn needs_exact_number(&self) -> bool {
        matches!(
            self,
            ColumnType::Decimal { .. }
                | ColumnType::Int128
                | ColumnType::UInt128
                | ColumnType::Int256
                | ColumnType::UInt256
        )
    }

    pub fn is_nullable(&self) -> bool {
        match self {
            ColumnType::Nullable(_) => true,
            ColumnType::LowCardinality(t) => t.is_nullable(),
            _ => false,
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Int8 => f.write_str("Int8"),
            ColumnType::Int16 => f.write_str("Int16"),
            ColumnType::Int32 => f.write_str("Int32"),
            ColumnType::Int64 => f.write_str("Int64"),
            ColumnType::UInt8 => f.write_str("UInt8"),
            ColumnType::UInt16 => f.write_str("UInt16"),
            ColumnType::UInt32 => f.write_str("UInt32"),
            ColumnType::UInt64 => f.write_str("UInt64"),
            ColumnType::Int128 => f.write_str("Int128"),
            ColumnType::UInt128 => f.write_str("UInt128"),
            ColumnType::Int256 => f.write_str("Int256"),
            ColumnType::UInt256 => f.write_str("UInt256"),
            ColumnType::BFloat16 => f.write_str("BFloat16"),
            ColumnType::Decimal { precision, scale } => write!(f, "Decimal({precision}, {scale})"),
            ColumnType::IPv6 => f.write_str("IPv6"),
            ColumnType::Enum { wide, values } => {
                f.write_str(if *wide { "Enum16(" } else { "Enum8(" })?;
                for (i, (name, v)) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(
                        f,
                        "'{}' = {v}",
                        name.replace('\\', "\\\\").replace('\'', "\\'")
                    )?;
                }
                f.write_str(")")
            }
            ColumnType::Time => f.write_str("Time"),
            ColumnType::Time64 { precision } => write!(f, "Time64({precision})"),
            ColumnType::Variant(vs) => {
                f.write_str("Variant(")?;
                for (i, t) in vs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{t}")?;
                }
                f.write_str(")")
            }
            ColumnType::Dynamic => f.write_str("Dynamic"),
            ColumnType::Interval(unit) => write!(f, "Interval{unit}"),
            ColumnType::QBit(t, n) => write!(f, "QBit({t}, {n})"),
            ColumnType::Json => f.write_str("JSON"),
            ColumnType::Float32 => f.write_str("Float32"),
            ColumnType::Float64 => f.write_str("Float64"),
            ColumnType::Bool => f.write_str("Bool"),
            ColumnType::String => f.write_str("String"),
            ColumnType::FixedString(n) => write!(f, "FixedString({n})"),
            ColumnType::Uuid => f.write_str("UUID"),
            ColumnType::Date => f.write_str("Date"),
            ColumnType::Date32 => f.write_str("Date32"),
            ColumnType::DateTime { tz: None } => f.write_str("DateTime"),
            ColumnType::DateTime { tz: Some(tz) } => write!(f, "DateTime('{tz}')"),
            ColumnType::DateTime64 {
                precision,
                tz: None,
            } => write!(f, "DateTime64({precision})"),
            ColumnType::DateTime64 {
                precision,
                tz: Some(tz),
            } => write!(f, "DateTime64({precision}, '{tz}')"),
            ColumnType::IPv4 => f.write_str("IPv4"),
            ColumnType::Nullable(t) => write!(f, "Nullable({t})"),
            ColumnType::LowCardinality(t) => write!(f, "LowCardinality({t})"),
            ColumnType::Array(t) => write!(f, "Array({t})"),
            ColumnType::Map(k, v) => write!(f, "Map({k}, {v})"),
            ColumnType::Tuple(els) => {
                f.write_str("Tuple(")?;
                for (i, (name, t)) in els.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match name {
                        Some(n) => write!(f, "{n} {t}")?,
                        None => write!(f, "{t}")?,
                    }
                }
                f.write_str(")")
            }
            ColumnType::Unsupported(s) => f.write_str(s),
        }
    }
}

fn point() -> ColumnType {
    ColumnType::Tuple(vec![
        (None, ColumnType::Float64),
        (None, ColumnType::Float64),
    ])
}

fn ring() -> ColumnType {
    ColumnType::Array(Box::new(point()))
}

/// A small recursive-descent parser over the type grammar ClickHouse prints:
/// `Name`, `Name(arg, ...)` where an argument is a type, a number or a quoted string.
struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

enum Arg {
    Type(ColumnType),
    /// A named tuple element: `name Type`.
    Named(String, ColumnType),
    Number(i64),
    Str(String),
    /// An Enum element: `'name' = number`.
    EnumValue(String, i64),
}

impl Parser<'_> {
    fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.pos == self.s.len()
    }

    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.pos) == Some(&c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Option<&str> {
        self.skip_ws();
        let start = self.pos;
        while self.pos < self.s.len()
            && (self.s[self.pos].is_ascii_alphanumeric() || self.s[self.pos] == b'_')
        {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        std::str::from_utf8(&self.s[start..self.pos]).ok()
    }

    fn parse_arg(&mut self) -> Option<Arg> {
        self.skip_ws();
        match self.s.get(self.pos)? {
            b'\'' => {
                self.pos += 1;
                let mut out = Vec::new();
                while let Some(&c) = self.s.get(self.pos) {
                    self.pos += 1;
                    match c {
                        b'\\' => {
                            out.push(*self.s.get(self.pos)?);
                            self.pos += 1;
                        }
                        b'\'' => {
                            let text = String::from_utf8(out).ok()?;
                            if self.eat(b'=') {
                                self.skip_ws();
                                let n = self.number()?;
                                return Some(Arg::EnumValue(text, n));
                            }
                            return Some(Arg::Str(text));
                        }
                        _ => out.push(c),
                    }
                }
                None
            }
            c if c.is_ascii_digit() || *c == b'-' => self.number().map(Arg::Number),
            _ => {
                let save = self.pos;
                let ty = self.parse_type()?;
                // Named tuple elements look like `name Type`.
                self.skip_ws();
                if matches!(self.s.get(self.pos), Some(c) if c.is_ascii_alphabetic()) {
                    self.pos = save;
                    let name = self.ident()?.to_string();
                    return self.parse_type().map(|t| Arg::Named(name, t));
                }
                Some(Arg::Type(ty))
            }
        }
    }

    fn number(&mut self) -> Option<i64> {
        let start = self.pos;
        if self.s.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        std::str::from_utf8(&self.s[start..self.pos])
            .ok()?
            .parse()
            .ok()
    }

    /// Skips a parenthesised argument list this parser does not model (the
    /// JSON type's path hints), honouring quotes and backticks.
    fn skip_args(&mut self) -> Option<()> {
        let mut depth = 1;
        let mut quote = None;
        while let Some(&c) = self.s.get(self.pos) {
            self.pos += 1;
            match (quote, c) {
                (Some(_), b'\\') => self.pos += 1,
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, b'\'' | b'`' | b'"') => quote = Some(c),
                (None, b'(') => depth += 1,
                (None, b')') => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(());
                    }
                }
                _ => {}
            }
        }
        None
    }

    fn parse_args(&mut self) -> Option<Vec<Arg>> {
        let mut args = Vec::new();
        if self.eat(b')') {
            return Some(args);
        }
        loop {
            args.push(self.parse_arg()?);
            if self.eat(b')') {
                return Some(args);
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    fn parse_type(&mut self) -> Option<ColumnType> {
        let start = self.pos;
        let name = self.ident()?.to_string();
        if matches!(
            name.as_str(),
            "JSON" | "Dynamic" | "AggregateFunction" | "Object"
        ) {
            if self.eat(b'(') {
                self.skip_args()?;
            }
            let text = std::str::from_utf8(&self.s[start..self.pos])
                .ok()?
                .trim()
                .to_string();
            return Some(match name.as_str() {
                "JSON" => ColumnType::Json,
                "Dynamic" => ColumnType::Dynamic,
                _ => ColumnType::Unsupported(text),
            });
        }
        let args = if self.eat(b'(') {
            Some(self.parse_args()?)
        } else {
            None
        };
        let text = std::str::from_utf8(&self.s[start..self.pos])
            .unwrap_or_default()
            .trim()
            .to_string();
        fn one_type(mut args: Vec<Arg>) -> Option<Box<ColumnType>> {
            match (args.pop(), args.is_empty()) {
                (Some(Arg::Type(t)), true) => Some(Box::new(t)),
                _ => None,
            }
        }
        let wrap = |inner: Option<Box<ColumnType>>, f: fn(Box<ColumnType>) -> ColumnType| {
            inner
                .map(f)
                .unwrap_or_else(|| ColumnType::Unsupported(text.clone()))
        };
        let ty = match (name.as_str(), args) {
            ("Int8", None) => ColumnType::Int8,
            ("Int16", None) => ColumnType::Int16,
            ("Int32", None) => ColumnType::Int32,
            ("Int64", None) => ColumnType::Int64,
            ("UInt8", None) => ColumnType::UInt8,
            ("UInt16", None) => ColumnType::UInt16,
            ("UInt32", None) => ColumnType::UInt32,
            ("UInt64", None) => ColumnType::UInt64,
            ("Float32", None) => ColumnType::Float32,
            ("Float64", None) => ColumnType::Float64,
            ("Bool", None) => ColumnType::Bool,
            ("String", None) => ColumnType::String,
            ("UUID", None) => ColumnType::Uuid,
            ("Date", None) => ColumnType::Date,
            ("Date32", None) => ColumnType::Date32,
            ("IPv4", None) => ColumnType::IPv4,
            ("IPv6", None) => ColumnType::IPv6,
            ("Int128", None) => ColumnType::Int128,
            ("UInt128", None) => ColumnType::UInt128,
            ("Int256", None) => ColumnType::Int256,
            ("UInt256", None) => ColumnType::UInt256,
            ("BFloat16", None) => ColumnType::BFloat16,
            ("Time", None) => ColumnType::Time,
            (
                i @ ("IntervalNanosecond"
                | "IntervalMicrosecond"
                | "IntervalMillisecond"
                | "IntervalSecond"
                | "IntervalMinute"
                | "IntervalHour"
                | "IntervalDay"
                | "IntervalWeek"
                | "IntervalMonth"
                | "IntervalQuarter"
                | "IntervalYear"),
                None,
            ) => ColumnType::Interval(i.trim_start_matches("Interval").to_string()),
            ("QBit", Some(mut a)) if a.len() == 2 => match (a.pop(), a.pop()) {
                (Some(Arg::Number(n)), Some(Arg::Type(t)))
                    if n > 0
                        && matches!(
                            t,
                            ColumnType::BFloat16 | ColumnType::Float32 | ColumnType::Float64
                        ) =>
                {
                    ColumnType::QBit(Box::new(t), n as usize)
                }
                _ => ColumnType::Unsupported(text.clone()),
            },
            ("Time64", Some(a)) => match a.as_slice() {
                [Arg::Number(p)] if (0..=9).contains(p) => ColumnType::Time64 {
                    precision: *p as u32,
                },
                _ => ColumnType::Unsupported(text.clone()),
            },
            ("DateTime" | "DateTime32", None) => ColumnType::DateTime { tz: None },
            // The geometry types are names for tuples and arrays of points.
            ("Point", None) => point(),
            ("Ring" | "LineString", None) => ring(),
            ("Polygon" | "MultiLineString", None) => ColumnType::Array(Box::new(ring())),
            ("MultiPolygon", None) => {
                ColumnType::Array(Box::new(ColumnType::Array(Box::new(ring()))))
            }
            ("MultiPoint", None) => ring(),
            // Its variants in ClickHouse's (sorted) order.
            ("Geometry", None) => ColumnType::Variant(
                [
                    "LineString",
                    "MultiLineString",
                    "MultiPolygon",
                    "Point",
                    "Polygon",
                    "Ring",
                ]
                .iter()
                .map(|t| ColumnType::parse(t))
                .collect(),
            ),
            ("Decimal", Some(a)) => match a.as_slice() {
                [Arg::Number(p), Arg::Number(s)]
                    if (1..=76).contains(p) && (0..=*p).contains(s) =>
                {
                    ColumnType::Decimal {
                        precision: *p as u32,
                        scale: *s as u32,
                    }
                }
                _ => ColumnType::Unsupported(text.clone()),
            },
            (d @ ("Decimal32" | "Decimal64" | "Decimal128" | "Decimal256"), Some(a)) => {
                let precision = match d {
                    "Decimal32" => 9,
                    "Decimal64" => 18,
                    "Decimal128" => 38,
                    _ => 76,
                };
                match a.as_slice() {
                    [Arg::Number(s)] if (0..=precision).contains(s) => ColumnType::Decimal {
                        precision: precision as u32,
                        scale: *s as u32,
                    },
                    _ => ColumnType::Unsupported(text.clone()),
                }
            }
            (e @ ("Enum8" | "Enum16"), Some(a)) => {
                let wide = e == "Enum16";
                let range = if wide {
                    i64::from(i16::MIN)..=i64::from(i16::MAX)
                } else {
                    i64::from(i8::MIN)..=i64::from(i8::MAX)
                };
                let values: Option<Vec<(String, i16)>> = a
                    .into_iter()
                    .map(|arg| match arg {
                        Arg::EnumValue(n, v) if range.contains(&v) => Some((n, v as i16)),
                        _ => None,
                    })
                    .collect();
                match values {
                    Some(values) if !values.is_empty() => ColumnType::Enum { wide, values },
                    _ => ColumnType::Unsupported(text.clone()),
                }
            }
            ("Variant", Some(a)) => {
                let types: Option<Vec<ColumnType>> = a
                    .into_iter()
                    .map(|arg| match arg {
                        Arg::Type(t) => Some(t),
                        _ => None,
                    })
                    .collect();
                match types {
                    Some(t) if !t.is_empty() && t.len() < 255 => ColumnType::Variant(t),
                    _ => ColumnType::Unsupported(text.clone()),
                }
            }
            // Aggregated with a simple function, stored and inserted as its type.
            ("SimpleAggregateFunction", Some(mut a)) if a.len() == 2 => match a.pop() {
                Some(Arg::Type(t)) => t,
                _ => ColumnType::Unsupported(text.clone()),
            },
            // `Nested(a T, b U)` kept whole (flatten_nested = 0) is an array of named tuples.
            ("Nested", Some(a)) => {
                let els: Option<Vec<(Option<String>, ColumnType)>> = a
                    .into_iter()
                    .map(|arg| match arg {
                        Arg::Named(n, t) => Some((Some(n), t)),
                        _ => None,
                    })
                    .collect();
                match els {
                    Some(els) if !els.is_empty() => {
                        ColumnType::Array(Box::new(ColumnType::Tuple(els)))
                    }
                    _ => ColumnType::Unsupported(text.clone()),
                }
            }
            ("FixedString", Some(a)) => match a.as_slice() {
                [Arg::Number(n)] if *n > 0 => ColumnType::FixedString(usize::try_from(*n).ok()?),
                _ => ColumnType::Unsupported(text.clone()),
            },
            ("DateTime" | "DateTime32", Some(a)) => match a.as_slice() {
                [Arg::Str(tz)] => ColumnType::DateTime {
                    tz: Some(tz.clone()),
                },
                _ => ColumnType::Unsupported(text.clone()),
            },
            ("DateTime64", Some(a)) => match a.as_slice() {
                [Arg::Number(p)] if (0..=9).contains(p) => ColumnType::DateTime64 {
                    precision: *p as u32,
                    tz: None,
                },
                [Arg::Number(p), Arg::Str(tz)] if (0..=9).contains(p) => ColumnType::DateTime64 {
                    precision: *p as u32,
                    tz: Some(tz.clone()),
                },
                _ => ColumnType::Unsupported(text.clone()),
            },
            ("Nullable", Some(a)) => wrap(one_type(a), ColumnType::Nullable),
            ("LowCardinality", Some(a)) => wrap(one_type(a), ColumnType::LowCardinality),
            ("Array", Some(a)) => wrap(one_type(a), ColumnType::Array),
            ("Map", Some(a)) => {
                let mut it = a.into_iter();
                match (it.next(), it.next(), it.next()) {
                    (Some(Arg::Type(k)), Some(Arg::Type(v)), None) => {
                        ColumnType::Map(Box::new(k), Box::new(v))
                    }
                    _ => ColumnType::Unsupported(text.clone()),
                }
            }
            ("Tuple", Some(a)) => {
                let els: Vec<(Option<String>, ColumnType)> = a
                    .into_iter()
                    .filter_map(|arg| match arg {
                        Arg::Type(t) => Some((None, t)),
                        Arg::Named(n, t) => Some((Some(n), t)),
                        _ => None,
                    })
                    .collect();
                let all_named = els.iter().all(|(n, _)| n.is_some());
                let none_named = els.iter().all(|(n, _)| n.is_none());
                if els.is_empty() || !(all_named || none_named) {
                    ColumnType::Unsupported(text.clone())
                } else {
                    ColumnType::Tuple(els)
                }
            }
            _ => ColumnType::Unsupported(text.clone()),
        };
        Some(ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scalars_and_wrappers() {
        assert_eq!(ColumnType::parse("UInt64"), ColumnType::UInt64);
        assert_eq!(
            ColumnType::parse("LowCardinality(Nullable(String))"),
            ColumnType::LowCardinality(Box::new(ColumnType::Nullable(Box::new(
                ColumnType::String
            ))))
        );
        assert_eq!(
            ColumnType::parse("Array(Array(Int32))"),
            ColumnType::Array(Box::new(ColumnType::Array(Box::new(ColumnType::Int32))))
        );
        assert_eq!(
            ColumnType::parse("Tuple(a UInt8, b Array(String))"),
            ColumnType::Tuple(vec![
                (Some("a".into()), ColumnType::UInt8),
                (
                    Some("b".into()),
                    ColumnType::Array(Box::new(ColumnType::String))
                )
            ])
        );
        assert_eq!(
            ColumnType::parse("Tuple(UInt8, String)").to_string(),
            "Tuple(UInt8, String)"
        );
        assert_eq!(
            ColumnType::parse("Tuple(a UInt8, b Map(String, UInt64))").to_string(),
            "Tuple(a UInt8, b Map(String, UInt64))"
        );
        assert!(!ColumnType::parse("Tuple(a UInt8, String)").is_supported());
        assert_eq!(
            ColumnType::parse("Map(String, UInt64)"),
            ColumnType::Map(Box::new(ColumnType::String), Box::new(ColumnType::UInt64))
        );
        assert_eq!(
            ColumnType::parse("FixedString(16)"),
            ColumnType::FixedString(16)
        );
    }

    #[test]
    fn parses_datetimes_with_time_zones() {
        assert_eq!(
            ColumnType::parse("DateTime('Europe/Paris')"),
            ColumnType::DateTime {
                tz: Some("Europe/Paris".into())
            }
        );
        assert_eq!(
            ColumnType::parse("DateTime64(3, 'UTC')"),
            ColumnType::DateTime64 {
                precision: 3,
                tz: Some("UTC".into())
            }
        );
        assert_eq!(
            ColumnType::parse("DateTime64(6)"),
            ColumnType::DateTime64 {
                precision: 6,
                tz: None
            }
        );
    }

    #[test]
    fn keeps_unsupported_types_by_name() {
        let t = ColumnType::parse("AggregateFunction(uniq, UInt64)");
        assert_eq!(
            t,
            ColumnType::Unsupported("AggregateFunction(uniq, UInt64)".into())
        );
        assert!(!t.is_supported());
        let nested = ColumnType::parse("Array(AggregateFunction(uniq, UInt64))");
        assert!(!nested.is_supported());
        assert_eq!(nested.to_string(), "Array(AggregateFunction(uniq, UInt64))");
        assert!(!ColumnType::parse("QBit(String, 8)").is_supported());
        assert_eq!(
            ColumnType::parse("QBit(Float32, 8)").to_string(),
            "QBit(Float32, 8)"
        );
        assert_eq!(
            ColumnType::parse("IntervalSecond").to_string(),
            "IntervalSecond"
        );
    }

    #[test]
    fn parses_the_types_of_26x() {
        assert_eq!(
            ColumnType::parse("Enum8('b\\'q' = -2, 'a' = 1)"),
            ColumnType::Enum {
                wide: false,
                values: vec![("b'q".into(), -2), ("a".into(), 1)]
            }
        );
        assert_eq!(
            ColumnType::parse("Decimal(76, 20)"),
            ColumnType::Decimal {
                precision: 76,
                scale: 20
            }
        );
        assert_eq!(
            ColumnType::parse("Decimal64(4)"),
            ColumnType::Decimal {
                precision: 18,
                scale: 4
            }
        );
        assert_eq!(
            ColumnType::parse("JSON(`a.b` UInt32, SKIP c)"),
            ColumnType::Json
        );
        assert_eq!(
            ColumnType::parse("Dynamic(max_types=8)"),
            ColumnType::Dynamic
        );
        assert_eq!(
            ColumnType::parse("SimpleAggregateFunction(sum, UInt64)"),
            ColumnType::UInt64
        );
        assert_eq!(
            ColumnType::parse("Nested(x UInt8, y String)").to_string(),
            "Array(Tuple(x UInt8, y String))"
        );
        assert_eq!(
            ColumnType::parse("Variant(Array(UInt8), String, UInt64)"),
            ColumnType::Variant(vec![
                ColumnType::Array(Box::new(ColumnType::UInt8)),
                ColumnType::String,
                ColumnType::UInt64
            ])
        );
        assert_eq!(
            ColumnType::parse("MultiPolygon").to_string(),
            "Array(Array(Array(Tuple(Float64, Float64))))"
        );
        assert_eq!(
            ColumnType::parse("Time64(3)"),
            ColumnType::Time64 { precision: 3 }
        );
        assert_eq!(
            ColumnType::parse("DateTime32('UTC')").to_string(),
            "DateTime('UTC')"
        );
        assert!(!ColumnType::parse("Decimal(77, 2)").is_supported());
        assert!(!ColumnType::parse("Enum8('a' = 300)").is_supported());
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "Nullable(DateTime64(3, 'UTC'))",
            "Map(String, Array(Nullable(Int8)))",
            "LowCardinality(String)",
            "Enum16('x' = 1000, 'y\\'z' = -1)",
            "Decimal(9, 2)",
            "Variant(String, UInt64)",
        ] {
            assert_eq!(ColumnType::parse(s).to_string(), s);
        }
    }
}
