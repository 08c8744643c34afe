//! A scanner of the flat JSON objects the collector writes as a change event's
//! columns: member by member, without allocating per row.
//!
//! It exists because parsing is most of the window compute's cost before the
//! SQL runs: strings without escapes are borrowed from the input, escaped ones
//! are decoded into a reused buffer, numbers keep their source text (so a
//! column of mixed kinds renders them exactly as written). Nested arrays and
//! objects, which the collector does not produce for row columns, are handed to
//! `serde_json` and rendered back as compact JSON text.

/// A member's value; strings borrow from the input or the scanner's buffer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Val<'s> {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer that fits `i64`, with its source text.
    Int(i64, &'s str),
    /// A number with a fraction or exponent, with its source text.
    Float(f64, &'s str),
    /// An integer beyond `i64` (e.g. a large `BIGINT UNSIGNED`): kept as text.
    Big(&'s str),
    /// A string, unescaped.
    Str(&'s str),
    /// An array or object, as compact JSON text.
    Nested(&'s str),
}

impl<'s> Val<'s> {
    /// The value as text, the way a column of mixed kinds shows it (`None` for null).
    pub(crate) fn as_text(self) -> Option<&'s str> {
        match self {
            Val::Null => None,
            Val::Bool(true) => Some("true"),
            Val::Bool(false) => Some("false"),
            Val::Int(_, text) | Val::Float(_, text) | Val::Big(text) => Some(text),
            Val::Str(text) | Val::Nested(text) => Some(text),
        }
    }
}

/// Where a scanned string lives until the member is handed out.
#[derive(Clone, Copy)]
enum Text<'a> {
    Input(&'a str),
    KeyBuffer,
    ValueBuffer,
}

#[derive(Clone, Copy)]
enum Raw<'a> {
    Null,
    Bool(bool),
    Int(i64, &'a str),
    Float(f64, &'a str),
    Big(&'a str),
    Str(Text<'a>),
    Nested,
}

/// A member's name: the hint given to [`Scanner::member`], or another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key<'s> {
    /// The name is the hint.
    Hint,
    /// Another name, unescaped.
    Name(&'s str),
}

/// Whether `name` can be matched against a member name's raw bytes: it has
/// nothing JSON writes escaped.
pub(crate) fn plain(name: &str) -> bool {
    !name.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)
}

/// Scans one JSON object at a time; reuse it across objects to reuse its buffers.
#[derive(Default)]
pub(crate) struct Scanner<'a> {
    text: &'a str,
    pos: usize,
    first: bool,
    key_buffer: String,
    value_buffer: String,
}

impl<'a> Scanner<'a> {
    /// Starts on `bytes`, which must hold one JSON object. The whole input is
    /// checked to be UTF-8 once here (fast on ASCII), so strings need no check
    /// of their own.
    pub(crate) fn start(&mut self, bytes: &'a [u8]) -> Result<(), String> {
        self.text =
            std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
        self.pos = 0;
        self.first = true;
        self.skip_whitespace();
        if self.peek() != Some(b'{') {
            return Err(self.fail("expected a JSON object"));
        }
        self.pos += 1;
        Ok(())
    }

    /// The next member, or `None` after the closing brace (which must end the
    /// input). `hint` is the name the member probably has (the same position
    /// in the previous row): when its raw bytes match, the name is not scanned
    /// (a [`plain`] hint only).
    pub(crate) fn member(&mut self, hint: Option<&str>) -> Result<Option<(Key<'_>, Val<'_>)>, String> {
        self.skip_whitespace();
        match (self.first, self.peek()) {
            (_, Some(b'}')) => {
                self.pos += 1;
                self.skip_whitespace();
                if self.pos != self.text.len() {
                    return Err(self.fail("unexpected text after the object"));
                }
                return Ok(None);
            }
            (true, _) => self.first = false,
            (false, Some(b',')) => {
                self.pos += 1;
                self.skip_whitespace();
            }
            (false, _) => return Err(self.fail("expected `,` or `}`")),
        }
        if self.peek() != Some(b'"') {
            return Err(self.fail("expected a member name"));
        }
        let key = match hint {
            Some(hint) if self.raw_name_is(hint) => {
                self.pos += hint.len() + 2;
                None
            }
            _ => Some(self.string(true)?),
        };
        self.skip_whitespace();
        if self.peek() != Some(b':') {
            return Err(self.fail("expected `:`"));
        }
        self.pos += 1;
        self.skip_whitespace();
        let raw = self.value()?;
        let value = match raw {
            Raw::Null => Val::Null,
            Raw::Bool(b) => Val::Bool(b),
            Raw::Int(v, text) => Val::Int(v, text),
            Raw::Float(v, text) => Val::Float(v, text),
            Raw::Big(text) => Val::Big(text),
            Raw::Str(text) => Val::Str(self.resolve(text)),
            Raw::Nested => Val::Nested(&self.value_buffer),
        };
        let key = match key {
            None => Key::Hint,
            Some(text) => Key::Name(self.resolve(text)),
        };
        Ok(Some((key, value)))
    }

    /// Whether the name at the opening quote under the cursor is exactly `name`.
    fn raw_name_is(&self, name: &str) -> bool {
        let start = self.pos + 1;
        let end = start + name.len();
        self.bytes().get(start..end) == Some(name.as_bytes()) && self.bytes().get(end) == Some(&b'"')
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn slice(&self, start: usize, end: usize) -> Result<&'a str, String> {
        self.text
            .get(start..end)
            .ok_or_else(|| format!("bytes {start}..{end} split a character"))
    }

    fn resolve(&self, text: Text<'a>) -> &str {
        match text {
            Text::Input(s) => s,
            Text::KeyBuffer => &self.key_buffer,
            Text::ValueBuffer => &self.value_buffer,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn fail(&self, what: &str) -> String {
        format!("{what} at byte {}", self.pos)
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self) -> Result<Raw<'a>, String> {
        match self.peek() {
            Some(b'"') => Ok(Raw::Str(self.string(false)?)),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal(b"true", Raw::Bool(true)),
            Some(b'f') => self.literal(b"false", Raw::Bool(false)),
            Some(b'n') => self.literal(b"null", Raw::Null),
            Some(b'[' | b'{') => self.nested(),
            _ => Err(self.fail("expected a value")),
        }
    }

    fn literal(&mut self, word: &[u8], value: Raw<'a>) -> Result<Raw<'a>, String> {
        if self.bytes().get(self.pos..self.pos + word.len()) == Some(word) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.fail("expected a value"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    /// A number. Integers are accumulated while scanned (negatively, so that
    /// `i64::MIN` fits); only fractions and exponents go through `f64` parsing.
    fn number(&mut self) -> Result<Raw<'a>, String> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let mut value: Option<i64> = Some(0);
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                while let Some(d @ b'0'..=b'9') = self.peek() {
                    value = value
                        .and_then(|v| v.checked_mul(10))
                        .and_then(|v| v.checked_sub(i64::from(d - b'0')));
                    self.pos += 1;
                }
            }
            _ => return Err(self.fail("expected a digit")),
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.fail("expected a digit after `.`"));
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.fail("expected a digit in the exponent"));
            }
            float = true;
        }
        let text = self.slice(start, self.pos)?;
        if float {
            let v = text.parse::<f64>().map_err(|_| self.fail("invalid number"))?;
            return Ok(Raw::Float(v, text));
        }
        let value = if negative {
            value
        } else {
            value.and_then(i64::checked_neg)
        };
        Ok(match value {
            Some(v) => Raw::Int(v, text),
            None => Raw::Big(text),
        })
    }

    /// A string starting at the opening quote. The common case (no escape)
    /// borrows the input; otherwise it is decoded into one of the buffers.
    fn string(&mut self, key: bool) -> Result<Text<'a>, String> {
        let bytes = self.bytes();
        self.pos += 1;
        let start = self.pos;
        let i = start + plain_run(bytes.get(start..).unwrap_or_default());
        match bytes.get(i) {
            Some(b'"') => {
                let text = self.slice(start, i)?;
                self.pos = i + 1;
                return Ok(Text::Input(text));
            }
            Some(b'\\') => {}
            Some(_) => return Err(format!("control character in a string at byte {i}")),
            None => return Err(format!("unterminated string at byte {start}")),
        }
        let mut out = std::mem::take(if key {
            &mut self.key_buffer
        } else {
            &mut self.value_buffer
        });
        out.clear();
        let result = self
            .slice(start, i)
            .map(|s| out.push_str(s))
            .and_then(|()| self.escaped(i, &mut out));
        if key {
            self.key_buffer = out;
        } else {
            self.value_buffer = out;
        }
        result?;
        Ok(if key { Text::KeyBuffer } else { Text::ValueBuffer })
    }

    /// The rest of a string from its first backslash at `i`, decoded into `out`.
    fn escaped(&mut self, mut i: usize, out: &mut String) -> Result<(), String> {
        let bytes = self.bytes();
        loop {
            match bytes.get(i) {
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    let (c, next) = unescape(bytes, i)?;
                    out.push(c);
                    i = next;
                }
                Some(_) => return Err(format!("control character in a string at byte {i}")),
                None => return Err(format!("unterminated string at byte {i}")),
            }
            let run = i + plain_run(bytes.get(i..).unwrap_or_default());
            out.push_str(self.slice(i, run)?);
            i = run;
        }
    }

    fn nested(&mut self) -> Result<Raw<'a>, String> {
        let rest = self.bytes().get(self.pos..).unwrap_or_default();
        let mut stream = serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
        match stream.next() {
            Some(Ok(value)) => {
                self.pos += stream.byte_offset();
                self.value_buffer.clear();
                self.value_buffer.push_str(&value.to_string());
                Ok(Raw::Nested)
            }
            Some(Err(e)) => Err(format!("{e} (in the value at byte {})", self.pos)),
            None => Err(self.fail("expected a value")),
        }
    }
}

/// How many bytes from the start of `bytes` need no attention inside a string
/// (not a quote, backslash or control character). Eight bytes at a time while
/// none does: strings are mostly such runs.
fn plain_run(bytes: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut words = bytes.chunks_exact(8);
    let mut n = 0;
    for word in words.by_ref() {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let w = u64::from_le_bytes(w);
        let special = has_zero_byte(w ^ (ONES * u64::from(b'"')))
            | has_zero_byte(w ^ (ONES * u64::from(b'\\')))
            // Bytes below 0x20 (valid for thresholds up to 0x80).
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS);
        if special != 0 {
            break;
        }
        n += 8;
    }
    n + bytes
        .get(n..)
        .unwrap_or_default()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(bytes.len() - n)
}

/// The character of the escape at `bytes[i]` (a backslash) and where the string goes on.
fn unescape(bytes: &[u8], i: usize) -> Result<(char, usize), String> {
    let simple = match bytes.get(i + 1) {
        Some(b'"') => '"',
        Some(b'\\') => '\\',
        Some(b'/') => '/',
        Some(b'b') => '\u{8}',
        Some(b'f') => '\u{c}',
        Some(b'n') => '\n',
        Some(b'r') => '\r',
        Some(b't') => '\t',
        Some(b'u') => return unicode_escape(bytes, i),
        _ => return Err(format!("invalid escape at byte {i}")),
    };
    Ok((simple, i + 2))
}

fn hex4(bytes: &[u8], at: usize) -> Option<u32> {
    let digits = std::str::from_utf8(bytes.get(at..at + 4)?).ok()?;
    u32::from_str_radix(digits, 16)
        .ok()
        .filter(|_| digits.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `\uXXXX`, with a UTF-16 surrogate pair taking two escapes.
fn unicode_escape(bytes: &[u8], i: usize) -> Result<(char, usize), String> {
    let bad = || format!("invalid \\u escape at byte {i}");
    let first = hex4(bytes, i + 2).ok_or_else(bad)?;
    if (0xD800..0xDC00).contains(&first) {
        if bytes.get(i + 6..i + 8) != Some(b"\\u") {
            return Err(bad());
        }
        let second = hex4(bytes, i + 8).ok_or_else(bad)?;
        if !(0xDC00..0xE000).contains(&second) {
            return Err(bad());
        }
        let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
        return char::from_u32(code).map(|c| (c, i + 12)).ok_or_else(bad);
    }
    char::from_u32(first).map(|c| (c, i + 6)).ok_or_else(bad)
}

#[cfg(test)]
mod tests;
