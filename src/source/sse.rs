//! The Server-Sent Events parser (DESIGN.md §5), pure and incremental:
//! bytes in, the number of dispatched events out. Fuzzed.

/// Incremental SSE parser: feed bytes, get the number of dispatched events.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    has_data: bool,
    pending_id: Option<String>,
    /// The last event ID seen (sent as `Last-Event-ID` on reconnect).
    pub(crate) last_id: Option<String>,
}

/// Lines longer than this are dropped (a hostile stream cannot grow memory).
const MAX_LINE: usize = 64 * 1024;

impl SseParser {
    /// Feeds a chunk; returns how many events were dispatched.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> usize {
        let mut events = 0;
        for &b in chunk {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                events += self.line_done(line);
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        events
    }

    fn line_done(&mut self, line: &[u8]) -> usize {
        if line.is_empty() {
            // Blank line: dispatch if anything was collected.
            let had = self.has_data || self.pending_id.is_some();
            if let Some(id) = self.pending_id.take() {
                self.last_id = Some(id);
            }
            self.has_data = false;
            return usize::from(had);
        }
        if line.starts_with(b":") {
            return 0; // heartbeat comment
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" | b"event" => self.has_data = true,
            b"id" if !value.contains(&0) => {
                self.pending_id = Some(String::from_utf8_lossy(value).into_owned());
            }
            _ => {}
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_comments_and_ids() {
        let mut p = SseParser::default();
        assert_eq!(p.feed(b": heartbeat\n\n"), 0);
        assert_eq!(
            p.feed(b"id: 7\nevent: keys\ndata: {\"generation\": 7}\n\n"),
            1
        );
        assert_eq!(p.last_id.as_deref(), Some("7"));
        // Split across chunks and CRLF.
        assert_eq!(p.feed(b"data: a\r"), 0);
        assert_eq!(p.feed(b"\n\r\nid:8\n"), 1);
        assert_eq!(p.feed(b"\n"), 1);
        assert_eq!(p.last_id.as_deref(), Some("8"));
        // Two events in one chunk.
        assert_eq!(p.feed(b"data: x\n\ndata: y\n\n"), 2);
    }

    #[test]
    fn endless_line_does_not_grow_memory() {
        let mut p = SseParser::default();
        for _ in 0..100 {
            p.feed(&[b'a'; 10_000]);
        }
        assert!(p.line.len() <= MAX_LINE);
    }
}
