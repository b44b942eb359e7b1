//! The Server-Sent Events parser (DESIGN.md §5), pure and incremental:
//! bytes in, the number of dispatched events out. Fuzzed by a property test
//! (any bytes cut anywhere give the same outcome as in one piece).
//!
//! It follows the WHATWG EventSource parsing rules
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>)
//! as far as a hint needs them:
//!
//! - lines end in CRLF, LF or CR alone; one BOM at the start is skipped;
//! - a line starting with `:` is a comment; otherwise the field name runs to
//!   the first `:` (or is the whole line) and one space after the colon is
//!   dropped from the value; names are case-sensitive, unknown ones ignored;
//! - `data` marks the block as carrying data (its text is never read: the
//!   fetch is the truth); `event` is accepted and ignored;
//! - `id` sets the last event ID buffer (unless the value holds NUL), which
//!   becomes the last event ID (sent as `Last-Event-ID`) at the block's blank
//!   line, with or without data; an empty id clears it;
//! - a blank line dispatches an event only when the block had a `data` field:
//!   a hub's `event: ping` with no data is a heartbeat, like a `: comment`;
//! - `retry` with a value of ASCII digits only sets the reconnection time in
//!   milliseconds. keysync honours it as a floor of its own reconnect
//!   backoff, capped at `max_backoff` like a `Retry-After`: a server can
//!   slow reconnects down, never make them faster than the backoff.
//!
//! When a stream ends, the half-read block is dropped ([`SseParser::reset`]).

use std::time::Duration;

/// Incremental SSE parser: feed bytes, get the number of dispatched events.
#[derive(Debug)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    /// The line being read went over [`MAX_LINE`]; the rest was dropped.
    overlong: bool,
    /// The last byte was a CR: an LF right after it ends no second line.
    after_cr: bool,
    /// The next line is the first of the stream (a BOM there is skipped).
    first_line: bool,
    /// The block being read has a `data` field.
    has_data: bool,
    /// The last event ID buffer: what the next blank line commits.
    id_buffer: String,
    /// The last event ID, empty for none.
    last_id: String,
    retry: Option<Duration>,
}

impl Default for SseParser {
    fn default() -> Self {
        SseParser {
            line: Vec::new(),
            overlong: false,
            after_cr: false,
            first_line: true,
            has_data: false,
            id_buffer: String::new(),
            last_id: String::new(),
            retry: None,
        }
    }
}

/// Lines longer than this are cut (a hostile stream cannot grow memory).
const MAX_LINE: usize = 64 * 1024;

const BOM: &[u8] = b"\xef\xbb\xbf";

impl SseParser {
    /// Feeds a chunk; returns how many events were dispatched.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> usize {
        let mut events = 0;
        for &b in chunk {
            match b {
                b'\n' if std::mem::take(&mut self.after_cr) => {}
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    events += self.line_done();
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() < MAX_LINE {
                        self.line.push(b);
                    } else {
                        self.overlong = true;
                    }
                }
            }
        }
        events
    }

    /// The last event ID, to send as `Last-Event-ID` on reconnect.
    pub(crate) fn last_id(&self) -> Option<&str> {
        (!self.last_id.is_empty()).then_some(self.last_id.as_str())
    }

    /// The reconnection time the server asked for with `retry:`.
    pub(crate) fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// A new stream begins: whatever the old one left half-read is dropped
    /// (an incomplete block is never dispatched); the last event ID and the
    /// reconnection time stay.
    pub(crate) fn reset(&mut self) {
        self.line.clear();
        self.overlong = false;
        self.after_cr = false;
        self.first_line = true;
        self.has_data = false;
        self.id_buffer.clone_from(&self.last_id);
    }

    fn line_done(&mut self) -> usize {
        let mut line = std::mem::take(&mut self.line);
        let overlong = std::mem::take(&mut self.overlong);
        if std::mem::take(&mut self.first_line) && line.starts_with(BOM) {
            line.drain(..BOM.len());
        }
        let events = self.process(&line, overlong);
        // Keep the allocation for the next line.
        line.clear();
        self.line = line;
        events
    }

    fn process(&mut self, line: &[u8], overlong: bool) -> usize {
        if line.is_empty() {
            self.last_id.clone_from(&self.id_buffer);
            return usize::from(std::mem::take(&mut self.has_data));
        }
        if line.starts_with(b":") {
            return 0; // a comment: a heartbeat
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => self.has_data = true,
            // A cut id or retry would be a wrong one: ignored.
            _ if overlong => {}
            b"id" if !value.contains(&0) => {
                self.id_buffer = String::from_utf8_lossy(value).into_owned();
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry = Some(
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .map_or(Duration::MAX, Duration::from_millis),
                );
            }
            _ => {}
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn count(input: &[u8]) -> usize {
        SseParser::default().feed(input)
    }

    #[test]
    fn events_comments_and_ids() {
        let mut p = SseParser::default();
        assert_eq!(p.feed(b": heartbeat\n\n"), 0);
        assert_eq!(
            p.feed(b"id: 7\nevent: keys\ndata: {\"generation\": 7}\n\n"),
            1
        );
        assert_eq!(p.last_id(), Some("7"));
        // Split across chunks and CRLF.
        assert_eq!(p.feed(b"data: a\r"), 0);
        assert_eq!(p.feed(b"\n\r\nid:8\n"), 1);
        // A block with only an id dispatches nothing, but sets the id.
        assert_eq!(p.feed(b"\n"), 0);
        assert_eq!(p.last_id(), Some("8"));
        // Two events in one chunk.
        assert_eq!(p.feed(b"data: x\n\ndata: y\n\n"), 2);
    }

    #[test]
    fn a_block_without_data_dispatches_nothing() {
        // nchan's and other hubs' keep-alive: an event type and no data.
        assert_eq!(count(b"event: ping\n\n"), 0);
        assert_eq!(count(b"event: ping\nid: 3\nretry: 10\n\n"), 0);
        assert_eq!(count(b"event: keys\ndata: 1\n\n"), 1);
        // An empty data field is data (the event's data is "").
        assert_eq!(count(b"data\n\n"), 1);
        assert_eq!(count(b"data:\n\n"), 1);
        // Field names are case-sensitive; unknown fields are ignored.
        assert_eq!(count(b"Data: x\n\n"), 0);
        assert_eq!(count(b"datum: x\nfoo\n\n"), 0);
        // Only a blank line dispatches; an unterminated block is pending.
        assert_eq!(count(b"data: x\n"), 0);
        assert_eq!(count(b"data: x"), 0);
    }

    #[test]
    fn an_id_alone_sets_the_last_event_id_without_dispatching() {
        let mut p = SseParser::default();
        assert_eq!(p.feed(b"id: 42\n\n"), 0);
        assert_eq!(p.last_id(), Some("42"));
        // The id stays until the server sets another, across events.
        assert_eq!(p.feed(b"data: a\n\n"), 1);
        assert_eq!(p.last_id(), Some("42"));
        // With and without the space after the colon; only one space goes.
        assert_eq!(p.feed(b"id:43\n\n"), 0);
        assert_eq!(p.last_id(), Some("43"));
        assert_eq!(p.feed(b"id:  44\n\n"), 0);
        assert_eq!(p.last_id(), Some(" 44"));
        // An id holding NUL is ignored; an empty id clears it.
        assert_eq!(p.feed(b"id: a\0b\n\n"), 0);
        assert_eq!(p.last_id(), Some(" 44"));
        assert_eq!(p.feed(b"id\n\n"), 0);
        assert_eq!(p.last_id(), None);
        // Not before the block's blank line.
        assert_eq!(p.feed(b"id: 45\n"), 0);
        assert_eq!(p.last_id(), None);
        assert_eq!(p.feed(b"\n"), 0);
        assert_eq!(p.last_id(), Some("45"));
    }

    #[test]
    fn every_line_ending_and_a_leading_bom() {
        // CR alone, LF alone, CRLF, and a CRLF split across chunks.
        assert_eq!(count(b"data: a\r\rdata: b\n\ndata: c\r\n\r\n"), 3);
        let mut p = SseParser::default();
        assert_eq!(p.feed(b"data: a\r"), 0);
        assert_eq!(p.feed(b"\n"), 0);
        assert_eq!(p.feed(b"\r"), 1);
        assert_eq!(p.feed(b"\n"), 0, "the LF of a CRLF is not another line");
        // One BOM at the start of the stream is skipped, a second is not.
        assert_eq!(count(b"\xef\xbb\xbfdata: x\n\n"), 1);
        assert_eq!(count(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n"), 0);
        let mut p = SseParser::default();
        assert_eq!(p.feed(b"\xef"), 0);
        assert_eq!(p.feed(b"\xbb\xbfdata: x\n\n"), 1);
    }

    #[test]
    fn retry_is_read_when_it_is_all_digits() {
        let mut p = SseParser::default();
        assert_eq!(p.retry(), None);
        p.feed(b"retry: 3000\n\n");
        assert_eq!(p.retry(), Some(Duration::from_secs(3)));
        for ignored in [
            &b"retry: 3s\n"[..],
            b"retry: -1\n",
            b"retry:\n",
            b"retry: 1.5\n",
        ] {
            p.feed(ignored);
            assert_eq!(p.retry(), Some(Duration::from_secs(3)), "{ignored:?}");
        }
        p.feed(b"retry: 99999999999999999999999\n");
        assert_eq!(p.retry(), Some(Duration::MAX));
    }

    #[test]
    fn a_new_connection_drops_the_half_read_event_and_keeps_the_id() {
        let mut p = SseParser::default();
        assert_eq!(p.feed(b"id: 9\ndata: a\n\nid: 10\ndata: b\nda"), 1);
        p.reset();
        // The old stream's pending line, data and uncommitted id are gone.
        assert_eq!(p.feed(b"ta: c\n\n"), 0);
        assert_eq!(p.last_id(), Some("9"));
        assert_eq!(p.feed(b"\n"), 0);
        // And a BOM may start the new stream.
        assert_eq!(p.feed(b"\xef\xbb\xbfdata: d\n\n"), 0);
        p.reset();
        assert_eq!(p.feed(b"\xef\xbb\xbfdata: d\n\n"), 1);
    }

    #[test]
    fn endless_line_does_not_grow_memory() {
        let mut p = SseParser::default();
        for _ in 0..100 {
            p.feed(&[b'a'; 10_000]);
        }
        assert!(p.line.len() <= MAX_LINE);
        // A long data line is still data; a long id is not taken.
        let mut p = SseParser::default();
        p.feed(b"id: ");
        p.feed(&[b'7'; 2 * MAX_LINE]);
        p.feed(b"\ndata: ");
        p.feed(&[b'x'; 2 * MAX_LINE]);
        assert_eq!(p.feed(b"\n\n"), 1);
        assert_eq!(p.last_id(), None);
    }

    /// What most random bytes are mapped to.
    const ALPHABET: &[u8] = b"\n\r: \0datidat:\n\r\xef\xbb\xbf7x\n\n::idretry";

    /// Pieces of the syntax mixed into the random bytes.
    const WORDS: &[&[u8]] = &[
        b"data:",
        b"id: ",
        b"event: ping",
        b"retry: 12",
        b"\r\n",
        b"\n\n",
        b"\xef\xbb\xbf",
    ];

    proptest! {
        /// Fuzz-safe: any bytes, cut anywhere, never panic and dispatch
        /// the same events with the same last id as in one piece.
        #[test]
        fn chunking_never_changes_the_outcome(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(0usize..400, 0..8),
            words in proptest::collection::vec(proptest::sample::select(WORDS), 0..20),
        ) {
            // Half of the bytes mean something to the parser.
            let mut input: Vec<u8> = data
                .into_iter()
                .map(|b| if b < 128 { ALPHABET[usize::from(b) % ALPHABET.len()] } else { b })
                .collect();
            for (i, w) in words.iter().enumerate() {
                let at = (i * 37) % (input.len() + 1);
                input.splice(at..at, w.iter().copied());
            }
            let mut whole = SseParser::default();
            let n = whole.feed(&input);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.len())).collect();
            cuts.sort_unstable();
            let mut pieces = SseParser::default();
            let mut m = 0;
            let mut from = 0;
            for c in cuts.into_iter().chain([input.len()]) {
                m += pieces.feed(&input[from..c]);
                from = c;
            }
            prop_assert_eq!(n, m);
            prop_assert_eq!(whole.last_id(), pieces.last_id());
            prop_assert_eq!(whole.retry(), pieces.retry());
        }
    }
}
