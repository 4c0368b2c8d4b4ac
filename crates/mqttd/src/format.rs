//! `mqttd sub -F`: Mosquitto's output format strings (mosquitto_sub(1), "OUTPUT FORMAT").
//!
//! `%` sequences print a field of the message (with optional `-` left alignment, `0` padding,
//! a width and a `.precision`, as Mosquitto parses them), `@` sequences pass one character to
//! strftime (`@N` is the nanoseconds), and `\` sequences are escapes. Unknown sequences print
//! nothing, as in Mosquitto. The odd corners (a `%x` width halves the bytes printed) follow
//! Mosquitto's code, so that scripts written for `mosquitto_sub` read the same output.

use std::io::Write;

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Local};
use mqttd_proto::InboundPublish;

/// A parsed `-F` format string.
#[derive(Debug, Clone)]
pub(crate) struct Format(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(Vec<u8>),
    Field(Field),
    /// `@X`: strftime's `%X`.
    Time(char),
    /// `@N`: nanoseconds within the second.
    Nanos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field {
    spec: u8,
    left: bool,
    zero: bool,
    width: usize,
    precision: Option<usize>,
}

/// A message as `-F` prints it: the publication, and the time it arrived.
pub(crate) struct Received<'a> {
    pub(crate) publish: &'a InboundPublish,
    /// Local wall-clock time of arrival.
    pub(crate) time: DateTime<Local>,
    /// Message expiry interval left on arrival, in seconds.
    pub(crate) expiry: Option<u32>,
}

impl Format {
    /// Parses `format` the way mosquitto_sub does; no string is an error.
    pub(crate) fn parse(format: &str) -> Self {
        let b = format.as_bytes();
        let len = b.len();
        let at = |i: usize| b.get(i).copied().unwrap_or(0);
        let mut pieces = Vec::new();
        let mut literal = Vec::new();
        let mut i = 0;
        while i < len {
            match at(i) {
                b'%' if i + 1 < len => {
                    i += 1;
                    let mut field = Field {
                        spec: 0,
                        left: false,
                        zero: false,
                        width: 0,
                        precision: None,
                    };
                    if at(i) == b'-' {
                        field.left = true;
                        if i + 1 < len {
                            i += 1;
                        }
                    }
                    if at(i) == b'0' {
                        field.zero = true;
                        if i + 1 < len {
                            i += 1;
                        }
                    }
                    while i + 1 < len && at(i).is_ascii_digit() {
                        field.width = field.width * 10 + usize::from(at(i) - b'0');
                        i += 1;
                    }
                    if at(i) == b'.' && i + 1 < len {
                        i += 1;
                        let mut precision = 0;
                        while i + 1 < len && at(i).is_ascii_digit() {
                            precision = precision * 10 + usize::from(at(i) - b'0');
                            i += 1;
                        }
                        field.precision = Some(precision);
                    }
                    field.spec = at(i);
                    flush(&mut pieces, &mut literal);
                    pieces.push(Piece::Field(field));
                }
                b'@' if i + 1 < len => {
                    i += 1;
                    match at(i) {
                        b'@' => literal.push(b'@'),
                        b'N' => {
                            flush(&mut pieces, &mut literal);
                            pieces.push(Piece::Nanos);
                        }
                        c => {
                            flush(&mut pieces, &mut literal);
                            pieces.push(Piece::Time(char::from(c)));
                        }
                    }
                }
                b'\\' if i + 1 < len => {
                    i += 1;
                    let escaped = match at(i) {
                        b'\\' => Some(b'\\'),
                        b'0' => Some(0),
                        b'a' => Some(7),
                        b'e' => Some(0x1b),
                        b'n' => Some(b'\n'),
                        b'r' => Some(b'\r'),
                        b't' => Some(b'\t'),
                        b'v' => Some(0x0b),
                        _ => None,
                    };
                    literal.extend(escaped);
                }
                // A lone `%`, `@` or `\` at the end prints nothing.
                b'%' | b'@' | b'\\' => {}
                c => literal.push(c),
            }
            i += 1;
        }
        flush(&mut pieces, &mut literal);
        Self(pieces)
    }

    /// Appends `message` as formatted to `out` (without the end of line).
    pub(crate) fn render(&self, message: &Received<'_>, out: &mut Vec<u8>) {
        for piece in &self.0 {
            match piece {
                Piece::Literal(bytes) => out.extend_from_slice(bytes),
                Piece::Field(field) => field.render(message, out),
                Piece::Time(c) => strftime(out, &message.time, &format!("%{c}")),
                Piece::Nanos => {
                    let _ = write!(out, "{:09}", message.time.timestamp_subsec_nanos());
                }
            }
        }
    }
}

fn flush(pieces: &mut Vec<Piece>, literal: &mut Vec<u8>) {
    if !literal.is_empty() {
        pieces.push(Piece::Literal(std::mem::take(literal)));
    }
}

/// Formats with a strftime pattern; a pattern chrono does not know prints nothing.
fn strftime(out: &mut Vec<u8>, time: &DateTime<Local>, pattern: &str) {
    let items: Vec<Item<'_>> = StrftimeItems::new(pattern).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return;
    }
    let _ = write!(out, "{}", time.format_with_items(items.iter()));
}

impl Field {
    fn render(&self, m: &Received<'_>, out: &mut Vec<u8>) {
        let message = &m.publish.message;
        let props = &message.properties;
        match self.spec {
            b'%' => out.push(b'%'),
            // Topic aliases are resolved before the message reaches us.
            b'A' => self.blank(out, self.pad()),
            b'C' => match &props.content_type {
                Some(s) => self.string(out, s.as_bytes()),
                None => self.blank(out, b' '),
            },
            b'D' => out.extend(props.correlation_data.iter().flatten()),
            b'E' => match m.expiry {
                Some(secs) => self.int(out, i64::from(secs)),
                None => self.blank(out, self.pad()),
            },
            b'F' => match props.payload_format_indicator {
                Some(f) => self.int(out, i64::from(f)),
                None => self.blank(out, self.pad()),
            },
            b'I' => {
                let mut time = Vec::new();
                strftime(&mut time, &m.time, "%Y-%m-%dT%H:%M:%S%z");
                self.string(out, &time);
            }
            b'j' => json(out, m, true),
            b'J' => json(out, m, false),
            b'l' => self.int(out, len_i64(message.payload.len())),
            // `%i` is mqttd's name for Mosquitto's `%m`.
            b'm' | b'i' => self.int(out, i64::from(packet_id(m))),
            b'P' => {
                for (n, (k, v)) in props.user_properties.iter().enumerate() {
                    if n > 0 {
                        out.push(b' ');
                    }
                    let _ = write!(out, "{k}:{v}");
                }
            }
            b'p' => self.payload(out, &message.payload, None),
            b'q' => out.push(b'0' + message.qos as u8),
            b'R' => {
                if let Some(t) = &props.response_topic {
                    self.string(out, t.as_bytes());
                }
            }
            b'r' => out.push(if message.retain { b'1' } else { b'0' }),
            b'S' => match m.publish.subscription_ids.first() {
                Some(id) => self.int(out, i64::from(id.get())),
                None => self.blank(out, self.pad()),
            },
            b't' => self.string(out, message.topic.as_bytes()),
            b'U' => {
                let _ = write!(
                    out,
                    "{}.{:09}",
                    m.time.timestamp(),
                    m.time.timestamp_subsec_nanos()
                );
            }
            b'x' => self.payload(out, &message.payload, Some(false)),
            b'X' => self.payload(out, &message.payload, Some(true)),
            _ => {}
        }
    }

    fn pad(&self) -> u8 {
        if self.zero {
            b'0'
        } else {
            b' '
        }
    }

    fn blank(&self, out: &mut Vec<u8>, pad: u8) {
        out.extend(std::iter::repeat_n(pad, self.width));
    }

    /// printf's `%d` with Mosquitto's flags.
    fn int(&self, out: &mut Vec<u8>, value: i64) {
        let w = self.width;
        let _ = if self.left {
            write!(out, "{value:<w$}")
        } else if self.zero {
            write!(out, "{value:0w$}")
        } else {
            write!(out, "{value:>w$}")
        };
    }

    /// printf's `%*.*s`: at most `precision` bytes, padded with blanks to the width.
    fn string(&self, out: &mut Vec<u8>, value: &[u8]) {
        let value = match self.precision {
            Some(p) => value.get(..p).unwrap_or(value),
            None => value,
        };
        let pad = self.width.saturating_sub(value.len());
        if !self.left {
            out.extend(std::iter::repeat_n(b' ', pad));
        }
        out.extend_from_slice(value);
        if self.left {
            out.extend(std::iter::repeat_n(b' ', pad));
        }
    }

    /// Mosquitto's `write_payload`: with a width, the payload is cut to the width (and, in
    /// hexadecimal, to half of that).
    fn payload(&self, out: &mut Vec<u8>, payload: &[u8], hex: Option<bool>) {
        let mut len = payload.len();
        let pad_len = if self.width > 0 {
            len = len.min(self.width);
            match hex {
                Some(_) => {
                    len /= 2;
                    self.width.saturating_sub(len * 2)
                }
                None => self.width - len,
            }
        } else {
            0
        };
        if !self.left {
            out.extend(std::iter::repeat_n(self.pad(), pad_len));
        }
        let bytes = payload.get(..len).unwrap_or(payload);
        match hex {
            None => out.extend_from_slice(bytes),
            Some(upper) => {
                for b in bytes {
                    let _ = if upper {
                        write!(out, "{b:02X}")
                    } else {
                        write!(out, "{b:02x}")
                    };
                }
            }
        }
        if self.left {
            out.extend(std::iter::repeat_n(b' ', pad_len));
        }
    }
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn packet_id(m: &Received<'_>) -> u16 {
    m.publish.packet_id.map_or(0, |id| id.get())
}

/// A JSON string, escaped as cJSON (and serde_json) escape it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

fn json_string(s: &str) -> Vec<u8> {
    let mut v = Vec::new();
    json_str(&mut v, s);
    v
}

/// `%j` (payload as a string, or an array of bytes when not UTF-8) and `%J` (payload as
/// JSON), in mosquitto_sub's field order.
fn json(out: &mut Vec<u8>, m: &Received<'_>, escaped: bool) {
    let message = &m.publish.message;
    let payload = &message.payload;
    let raw = match escaped {
        true => None,
        false => match serde_json::from_slice::<serde_json::Value>(payload) {
            Ok(_) => Some(payload),
            Err(_) => {
                eprintln!(
                    "Error: Message payload is not valid JSON on topic {}.",
                    message.topic
                );
                return;
            }
        },
    };
    let tst = format!(
        "{}.{:06}Z{}",
        m.time.format("%Y-%m-%dT%H:%M:%S"),
        m.time.timestamp_subsec_micros(),
        m.time.format("%z")
    );
    out.extend_from_slice(b"{\"tst\":");
    json_str(out, &tst);
    out.extend_from_slice(b",\"topic\":");
    json_str(out, message.topic.as_str());
    let _ = write!(
        out,
        ",\"qos\":{},\"retain\":{},\"payloadlen\":{}",
        message.qos as u8,
        u8::from(message.retain),
        payload.len()
    );
    if let Some(id) = m.publish.packet_id {
        let _ = write!(out, ",\"mid\":{}", id.get());
    }
    json_properties(out, m);
    out.extend_from_slice(b",\"payload\":");
    match raw {
        Some(json) => out.extend_from_slice(json),
        None if payload.is_empty() => out.extend_from_slice(b"null"),
        // Text as a string, as Debian's mosquitto_sub 2.0.11 prints every payload (later
        // versions print an array for anything but printable ASCII); bytes that are not
        // UTF-8 as an array of numbers, as those later versions do, so the output stays JSON.
        None => match std::str::from_utf8(payload) {
            Ok(text) => json_str(out, text),
            Err(_) => {
                out.push(b'[');
                for (n, b) in payload.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    let _ = write!(out, "{b}");
                }
                out.push(b']');
            }
        },
    }
    out.push(b'}');
}

/// The message's MQTT 5 properties as mosquitto_sub names them; nothing when it has none.
fn json_properties(out: &mut Vec<u8>, m: &Received<'_>) {
    let props = &m.publish.message.properties;
    let mut fields: Vec<(&str, Vec<u8>)> = Vec::new();
    if let Some(f) = props.payload_format_indicator {
        fields.push(("payload-format-indicator", vec![b'0' + u8::from(f)]));
    }
    if let Some(e) = m.expiry {
        fields.push(("message-expiry-interval", e.to_string().into_bytes()));
    }
    if let Some(c) = &props.content_type {
        fields.push(("content-type", json_string(c.as_str())));
    }
    if let Some(r) = &props.response_topic {
        fields.push(("response-topic", json_string(r.as_str())));
    }
    if let Some(d) = &props.correlation_data {
        fields.push(("correlation-data", json_string(&String::from_utf8_lossy(d))));
    }
    for id in &m.publish.subscription_ids {
        fields.push(("subscription-identifier", id.to_string().into_bytes()));
    }
    if !props.user_properties.is_empty() {
        let mut v = vec![b'{'];
        for (n, (k, val)) in props.user_properties.iter().enumerate() {
            if n > 0 {
                v.push(b',');
            }
            json_str(&mut v, k.as_str());
            v.push(b':');
            json_str(&mut v, val.as_str());
        }
        v.push(b'}');
        fields.push(("user-properties", v));
    }
    if fields.is_empty() {
        return;
    }
    out.extend_from_slice(b",\"properties\":{");
    for (n, (name, v)) in fields.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        json_str(out, name);
        out.push(b':');
        out.extend_from_slice(v);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use mqttd_proto::{Message, PacketId, QoS, TopicName};

    fn publish(topic: &str, payload: &[u8], qos: QoS, retain: bool) -> InboundPublish {
        InboundPublish {
            message: Message::new(
                TopicName::try_from(topic).unwrap(),
                payload.to_vec(),
                qos,
                retain,
            ),
            packet_id: PacketId::new(7).filter(|_| qos != QoS::AtMostOnce),
            dup: false,
            subscription_ids: Vec::new(),
        }
    }

    fn render(format: &str, p: &InboundPublish) -> String {
        let time = Local.timestamp_opt(1_470_818_943, 786_368_637).unwrap();
        let m = Received {
            publish: p,
            time,
            expiry: None,
        };
        let mut out = Vec::new();
        Format::parse(format).render(&m, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn message_fields() {
        let p = publish("a/b", b"hello", QoS::AtLeastOnce, true);
        assert_eq!(render("%t %p %q %r %m %i %l", &p), "a/b hello 1 1 7 7 5");
        assert_eq!(
            render("%x|%X", &publish("t", b"\x01\xab", QoS::AtMostOnce, false)),
            "01ab|01AB"
        );
        assert_eq!(
            render("%%|%m|%r", &publish("t", b"", QoS::AtMostOnce, false)),
            "%|0|0"
        );
    }

    #[test]
    fn widths_and_escapes_as_mosquitto() {
        let p = publish("topic", b"payload", QoS::AtMostOnce, false);
        assert_eq!(
            render("[%8t][%-8t][%.3t][%6.2t]", &p),
            "[   topic][topic   ][top][    to]"
        );
        assert_eq!(render("[%05l][%-5l][%5l]", &p), "[00007][7    ][    7]");
        // A payload wider than the field is cut to it.
        assert_eq!(render("[%3p][%9p]", &p), "[pay][  payload]");
        assert_eq!(render("a\\tb\\nc\\\\d\\q", &p), "a\tb\nc\\d");
        assert_eq!(render("@@ 50%", &p), "@ 50");
        assert_eq!(render("[%C][%3C][%R][%03E]", &p), "[][   ][][000]");
    }

    #[test]
    fn times() {
        let p = publish("t", b"x", QoS::AtMostOnce, false);
        assert_eq!(render("%U", &p), "1470818943.786368637");
        assert_eq!(render("@N", &p), "786368637");
        let iso = render("%I", &p);
        let expected = Local
            .timestamp_opt(1_470_818_943, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%S%z")
            .to_string();
        assert_eq!(iso, expected);
        assert_eq!(render("@Y", &p), expected.get(..4).unwrap());
    }

    #[test]
    fn json_as_mosquitto_sub_prints_it() {
        let time = Local.timestamp_opt(1_470_818_943, 786_368_637).unwrap();
        let tst = format!(
            "{}.786368Z{}",
            time.format("%Y-%m-%dT%H:%M:%S"),
            time.format("%z")
        );
        let p = publish("a/\"b\"", b"say \"hi\"\\", QoS::AtLeastOnce, false);
        assert_eq!(
            render("%j", &p),
            format!(
                r#"{{"tst":"{tst}","topic":"a/\"b\"","qos":1,"retain":0,"payloadlen":9,"mid":7,"payload":"say \"hi\"\\"}}"#
            )
        );
        let p = publish("t", b"\x00\xff", QoS::AtMostOnce, true);
        assert_eq!(
            render("%j", &p),
            format!(
                r#"{{"tst":"{tst}","topic":"t","qos":0,"retain":1,"payloadlen":2,"payload":[0,255]}}"#
            )
        );
        let p = publish("t", br#"{"a":[1,2]}"#, QoS::AtMostOnce, false);
        assert_eq!(
            render("%J", &p),
            format!(
                r#"{{"tst":"{tst}","topic":"t","qos":0,"retain":0,"payloadlen":11,"payload":{{"a":[1,2]}}}}"#
            )
        );
        assert_eq!(
            render("%J", &publish("t", b"not json", QoS::AtMostOnce, false)),
            ""
        );
    }

    #[test]
    fn json_properties_by_mosquitto_names() {
        let mut p = publish("t", b"x", QoS::AtMostOnce, false);
        let props = &mut p.message.properties;
        props.content_type = Some("text/plain".try_into().unwrap());
        props.user_properties = vec![("k".try_into().unwrap(), "v".try_into().unwrap())];
        let out = render("%j", &p);
        assert!(
            out.contains(r#","properties":{"content-type":"text/plain","user-properties":{"k":"v"}},"payload":"x"}"#),
            "{out}"
        );
        assert_eq!(render("%C %P", &p), "text/plain k:v");
    }
}
