//! The decoders that hand a record to the route's mapping (mapping.rs):
//! JSON with a mapping, CSV and TSV lines, raw values, and the record formats
//! (Avro, Protobuf) through their [`RecordReader`].

use std::borrow::Cow;

use super::json::JsonFields;
use super::mapping::{Fields, Mapping};
use super::value::Value;
use super::{DecodeLimits, Decoder, Meta, RecordError, RecordErrorKind, RecordReader};

fn empty() -> RecordError {
    RecordError {
        kind: RecordErrorKind::Empty,
        column: None,
        message: "the message has no value".into(),
    }
}

fn malformed(message: String) -> RecordError {
    RecordError {
        kind: RecordErrorKind::Malformed,
        column: None,
        message,
    }
}

/// JSON whose columns come from nested paths, constants, metadata or flattening.
pub struct MappedJson {
    pub mapping: Mapping,
    pub limits: DecodeLimits,
}

impl Decoder for MappedJson {
    fn decode(&mut self, rec: &Meta<'_>, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.limits.check(rec.value)?;
        let value = rec
            .value
            .filter(|v| !v.iter().all(u8::is_ascii_whitespace))
            .ok_or_else(empty)?;
        let text = std::str::from_utf8(value)
            .map_err(|e| malformed(format!("the message is not UTF-8 text: {e}")))?;
        let fields = JsonFields::parse(text).map_err(|e| malformed(e.to_string()))?;
        self.mapping.write_row(&fields, rec.value, rec, out)
    }
}

/// The raw value into one column (plus whatever metadata the mapping adds).
pub struct Raw {
    pub mapping: Mapping,
    pub limits: DecodeLimits,
}

struct NoFields;

impl<'a> Fields<'a> for NoFields {
    fn get(&self, _: &[String]) -> Option<Cow<'_, Value<'a>>> {
        None
    }
    fn names(&self) -> Vec<Cow<'_, str>> {
        Vec::new()
    }
}

impl Decoder for Raw {
    fn decode(&mut self, rec: &Meta<'_>, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.limits.check(rec.value)?;
        rec.value.ok_or_else(empty)?;
        self.mapping.write_row(&NoFields, rec.value, rec, out)
    }
}

/// A record format (Avro, Protobuf) decoded by its reader, then mapped.
pub struct Records<R: RecordReader> {
    pub reader: R,
    pub mapping: Mapping,
    pub limits: DecodeLimits,
}

impl<R: RecordReader> Decoder for Records<R> {
    fn decode(&mut self, rec: &Meta<'_>, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.limits.check(rec.value)?;
        let value = rec.value.filter(|v| !v.is_empty()).ok_or_else(empty)?;
        let record = self.reader.read(value)?;
        self.limits.check_value(&record)?;
        self.mapping.write_row(&record, rec.value, rec, out)
    }
}

/// One CSV (RFC 4180) or TSV (ClickHouse's TabSeparated escaping) line per
/// message, its cells named by `fields` in order.
pub struct Delimited {
    tsv: bool,
    names: Vec<String>,
    mapping: Mapping,
    limits: DecodeLimits,
}

impl Delimited {
    pub fn new(tsv: bool, names: Vec<String>, mapping: Mapping, limits: DecodeLimits) -> Delimited {
        Delimited {
            tsv,
            names,
            mapping,
            limits,
        }
    }
}

/// Cells by name, borrowed from the line unless unquoting or unescaping
/// changed them. An empty unquoted CSV cell and a TSV `\N` are NULL.
struct Cells<'a> {
    names: &'a [String],
    cells: Vec<Option<Cow<'a, str>>>,
}

impl<'a> Fields<'a> for Cells<'a> {
    fn get(&self, path: &[String]) -> Option<Cow<'_, Value<'a>>> {
        let [name] = path else { return None };
        let i = self.names.iter().position(|n| n == name)?;
        Some(Cow::Owned(match self.cells.get(i)? {
            None => Value::Null,
            Some(s) => Value::Str(s.clone()),
        }))
    }
    fn names(&self) -> Vec<Cow<'_, str>> {
        self.names
            .iter()
            .map(|n| Cow::Borrowed(n.as_str()))
            .collect()
    }
}

impl Decoder for Delimited {
    fn decode(&mut self, rec: &Meta<'_>, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.limits.check(rec.value)?;
        let value = rec.value.ok_or_else(empty)?;
        let text = std::str::from_utf8(value)
            .map_err(|e| malformed(format!("the line is not UTF-8 text: {e}")))?;
        let line = text.strip_suffix('\n').unwrap_or(text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        let cells = if self.tsv {
            split_tsv(line)?
        } else {
            split_csv(line)?
        };
        if cells.len() != self.names.len() {
            return Err(malformed(format!(
                "the line has {} fields, the route expects {} ({})",
                cells.len(),
                self.names.len(),
                self.names.join(", ")
            )));
        }
        let fields = Cells {
            names: &self.names,
            cells,
        };
        self.mapping.write_row(&fields, rec.value, rec, out)
    }
}

/// RFC 4180: fields separated by commas, quoted with `"` when they hold
/// commas, quotes or line breaks, a quote inside doubled.
fn split_csv(line: &str) -> Result<Vec<Option<Cow<'_, str>>>, RecordError> {
    let mut cells = Vec::new();
    let mut rest = line;
    loop {
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut cell = String::new();
            let mut tail = quoted;
            loop {
                let Some(q) = tail.find('"') else {
                    return Err(malformed("a quoted CSV field is not closed".into()));
                };
                cell.push_str(&tail[..q]);
                tail = &tail[q + 1..];
                match tail.strip_prefix('"') {
                    Some(after) => {
                        cell.push('"');
                        tail = after;
                    }
                    None => break,
                }
            }
            cells.push(Some(Cow::Owned(cell)));
            match tail.chars().next() {
                Some(',') => rest = &tail[1..],
                None => return Ok(cells),
                Some(c) => {
                    return Err(malformed(format!(
                        "unexpected {c:?} after a quoted CSV field (expected a comma)"
                    )))
                }
            }
            continue;
        }
        let (cell, next) = match rest.find(',') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        cells.push((!cell.is_empty()).then_some(Cow::Borrowed(cell)));
        match next {
            Some(n) => rest = n,
            None => return Ok(cells),
        }
    }
}

/// TabSeparated: tabs between fields, `\t` `\n` `\\` (and `\r`, `\0`, `\'`)
/// escaped inside them, `\N` for NULL.
fn split_tsv(line: &str) -> Result<Vec<Option<Cow<'_, str>>>, RecordError> {
    line.split('\t')
        .map(|raw| {
            if raw == "\\N" {
                return Ok(None);
            }
            if !raw.contains('\\') {
                return Ok(Some(Cow::Borrowed(raw)));
            }
            let mut cell = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    cell.push(c);
                    continue;
                }
                cell.push(match chars.next() {
                    Some('t') => '\t',
                    Some('n') => '\n',
                    Some('r') => '\r',
                    Some('0') => '\0',
                    Some('b') => '\u{8}',
                    Some('f') => '\u{c}',
                    Some(c @ ('\\' | '\'' | '"')) => c,
                    Some(c) => {
                        return Err(malformed(format!("unknown TSV escape \\{c}")));
                    }
                    None => return Err(malformed("a TSV field ends with a lone backslash".into())),
                });
            }
            Ok(Some(Cow::Owned(cell)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_tsv_cells() {
        assert_eq!(
            split_csv(r#"1,"a,""b""",,x"#).unwrap(),
            vec![
                Some("1".into()),
                Some("a,\"b\"".into()),
                None,
                Some("x".into())
            ]
        );
        assert!(split_csv(r#""open"#).is_err());
        // A quoted empty cell is an empty string, an unquoted one NULL.
        assert_eq!(split_csv(r#""","#).unwrap(), vec![Some("".into()), None]);
        assert!(split_csv(r#""a"b"#).is_err());
        assert_eq!(
            split_tsv("1\ta\\tb\\n\t\\N").unwrap(),
            vec![Some("1".into()), Some("a\tb\n".into()), None]
        );
        assert!(split_tsv("a\\").is_err());
    }
}
