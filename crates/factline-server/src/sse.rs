//! Reading a Server-Sent Events stream: the client side of the
//! subscriptions, for Rust consumers, the load benchmark and the tests.

/// One message of an event stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// The `id:` field: the event's global position.
    pub id: Option<String>,
    /// The `event:` name; `None` for plain events.
    pub event: Option<String>,
    /// The `data:` lines, joined with newlines.
    pub data: String,
}

/// Splits the bytes of an event stream into messages, however the bytes
/// are chunked; comment lines (heartbeats) are counted.
#[derive(Default)]
pub struct SseParser {
    /// Bytes, not text: a chunk may end inside a multi-byte character.
    pending: Vec<u8>,
    /// Comment lines seen so far.
    pub comments: usize,
}

impl SseParser {
    /// Adds bytes as they arrived.
    pub fn push(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
    }

    /// The next complete message, if one has arrived.
    pub fn next_message(&mut self) -> Option<SseMessage> {
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.pending.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block);
            let mut message = SseMessage::default();
            let mut has_field = false;
            for line in block.lines().filter(|l| !l.is_empty()) {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                has_field = true;
                match field {
                    "id" => message.id = Some(value.to_owned()),
                    "event" => message.event = Some(value.to_owned()),
                    "data" => {
                        if !message.data.is_empty() {
                            message.data.push('\n');
                        }
                        message.data.push_str(value);
                    }
                    _ => {}
                }
            }
            if has_field {
                return Some(message);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_whole_however_the_bytes_are_split() {
        let stream =
            ":heartbeat\n\nid: 1\ndata: {\"a\":\"é😀\"}\n\nevent: error\ndata: x\ndata: y\n\n"
                .as_bytes();
        for split in 1..stream.len() {
            let mut parser = SseParser::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(split) {
                parser.push(chunk);
                while let Some(m) = parser.next_message() {
                    got.push(m);
                }
            }
            assert_eq!(parser.comments, 1);
            assert_eq!(
                got,
                [
                    SseMessage {
                        id: Some("1".into()),
                        event: None,
                        data: "{\"a\":\"é😀\"}".into()
                    },
                    SseMessage {
                        id: None,
                        event: Some("error".into()),
                        data: "x\ny".into()
                    },
                ],
                "chunks of {split}"
            );
        }
    }
}
