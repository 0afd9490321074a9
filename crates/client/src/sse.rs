//! An incremental Server-Sent Events parser (the WHATWG "event stream
//! interpretation"), fed with the body's chunks as they arrive.
//!
//! Key decisions:
//! - Byte-wise line splitting on `\n`, `\r\n` and `\r`, with a `\r` at the
//!   end of one chunk and `\n` at the start of the next counted as one line
//!   end; fields are decoded as UTF-8 (lossy) only once a line is complete,
//!   so a multi-byte character split across chunks is never mangled.
//! - As the spec says: `data` lines are joined with `\n`; an event with no
//!   `data` is not dispatched; `id` sets the last event id (kept across
//!   events, ignored if it contains NUL); comments (`:`) and unknown fields
//!   are ignored; the event type defaults to `message`.
//! - A line longer than [`MAX_LINE`] is an error rather than unbounded
//!   memory.

/// The longest line accepted (a Request document is well below this).
pub(crate) const MAX_LINE: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` type, `message` when none was given.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id at dispatch time.
    pub id: Option<String>,
}

/// The parser state of one connection.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    line: Vec<u8>,
    after_cr: bool,
    first_line: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: Option<String>,
}

impl Parser {
    pub fn new() -> Self {
        Parser {
            first_line: true,
            ..Parser::default()
        }
    }

    /// Feeds a chunk; appends the events it completes to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), String> {
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out);
                }
                _ => {
                    if self.line.len() >= MAX_LINE {
                        return Err(format!("an event stream line is over {MAX_LINE} bytes"));
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let raw = std::mem::take(&mut self.line);
        let mut bytes = &raw[..];
        if std::mem::take(&mut self.first_line) {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        if bytes.is_empty() {
            self.dispatch(out);
            return;
        }
        if bytes[0] == b':' {
            return;
        }
        let text = String::from_utf8_lossy(bytes);
        let (field, value) = match text.find(':') {
            Some(i) => {
                let v = &text[i + 1..];
                (&text[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (&text[..], ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        let data = std::mem::take(&mut self.data);
        if !std::mem::take(&mut self.has_data) {
            return;
        }
        out.push(SseEvent {
            event: if event.is_empty() {
                "message".to_string()
            } else {
                event
            },
            data,
            id: self.last_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out).unwrap();
        }
        out
    }

    fn ev(event: &str, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: id.map(Into::into),
        }
    }

    #[test]
    fn parses_events_ids_and_comments() {
        let got = parse_chunks(&[
            b": keep-alive\n\nevent: status\nid: 3\ndata: {\"a\":1}\n\n",
            b"event:progress\ndata:x\ndata: y\n\n",
            b"data: plain\n\n",
        ]);
        assert_eq!(
            got,
            vec![
                ev("status", "{\"a\":1}", Some("3")),
                ev("progress", "x\ny", Some("3")),
                ev("message", "plain", Some("3")),
            ]
        );
    }

    #[test]
    fn any_line_ending_and_any_split() {
        let text =
            "\u{FEFF}event: status\r\nid: 7\rdata: é€\r\n\r\nevent: status\nid: 8\ndata: 2\n\n";
        let whole = parse_chunks(&[text.as_bytes()]);
        assert_eq!(
            whole,
            vec![ev("status", "é€", Some("7")), ev("status", "2", Some("8"))]
        );
        // Every split point, including inside "\r\n" and inside a character.
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            assert_eq!(
                parse_chunks(&[&bytes[..i], &bytes[i..]]),
                whole,
                "split at {i}"
            );
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_chunks(&singles), whole);
    }

    #[test]
    fn events_without_data_and_unfinished_events_are_not_dispatched() {
        let got = parse_chunks(&[b"event: status\nid: 1\n\nretry: 10\nunknown: x\n\ndata: half"]);
        assert!(got.is_empty());
        // The id still counts for the next event.
        let got = parse_chunks(&[b"id: 1\n\ndata: x\n\n"]);
        assert_eq!(got, vec![ev("message", "x", Some("1"))]);
        // A field with no colon is a field with an empty value.
        let got = parse_chunks(&[b"data\n\n"]);
        assert_eq!(got, vec![ev("message", "", None)]);
        // An id with NUL is ignored.
        let got = parse_chunks(&[b"id: 4\n\nid: a\0b\ndata: z\n\n"]);
        assert_eq!(got, vec![ev("message", "z", Some("4"))]);
    }
}
