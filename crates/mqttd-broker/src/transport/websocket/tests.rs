use super::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// A client frame: masked, as clients must.
fn frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn binary(payload: &[u8]) -> Vec<u8> {
    frame(OP_BINARY, true, payload, [0x11, 0x22, 0x33, 0x44])
}

/// Decodes `input` in chunks ending at `cuts`; the payload, or the first error.
fn decode_in_chunks(
    decoder: &mut Decoder,
    input: &[u8],
    cuts: &[usize],
) -> Result<Vec<u8>, FrameError> {
    let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c < input.len()).collect();
    cuts.sort_unstable();
    cuts.push(input.len());
    let mut out = Vec::new();
    let mut from = 0;
    for cut in cuts {
        let mut chunk = input[from..cut].to_vec();
        let (kept, result) = decoder.decode(&mut chunk);
        out.extend_from_slice(&chunk[..kept]);
        result?;
        from = cut;
    }
    Ok(out)
}

/// A server frame as the client sees it: (fin, opcode, payload).
/// A frame: (fin, opcode, payload).
type Frame = (bool, u8, Vec<u8>);

fn parse_server_frame(bytes: &[u8]) -> Option<(Frame, usize)> {
    let (&b0, &b1) = (bytes.first()?, bytes.get(1)?);
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    let (len, at) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = bytes.get(at..at + len)?.to_vec();
    Some(((b0 & 0x80 != 0, b0 & 0x0f, payload), at + len))
}

#[test]
fn extended_lengths_decode() {
    for len in [0, 1, 125, 126, 127, 0xffff, 0x10000, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let mut d = Decoder::new();
        let out = decode_in_chunks(&mut d, &binary(&payload), &[1, 3, 9, 1000]).unwrap();
        assert_eq!(out, payload, "{len}");
    }
}

#[test]
fn forbidden_frames_are_refused_with_their_close_code() {
    let m = [1, 2, 3, 4];
    let mut unmasked = binary(b"x");
    unmasked[1] &= 0x7f;
    let mut reserved = binary(b"x");
    reserved[0] |= 0x40;
    let mut huge = frame(OP_BINARY, true, &[], m);
    huge[1] = 0x80 | 127;
    huge.splice(2..2, [0x80, 0, 0, 0, 0, 0, 0, 0]);
    let cases: Vec<(Vec<u8>, FrameError)> = vec![
        (frame(OP_TEXT, true, b"{}", m), FrameError::Text),
        (unmasked, FrameError::Unmasked),
        (reserved, FrameError::Reserved),
        (frame(0x3, true, b"", m), FrameError::Opcode(3)),
        (frame(OP_PING, false, b"", m), FrameError::Control),
        (frame(OP_PING, true, &[0; 126], m), FrameError::Control),
        (
            frame(OP_CONTINUATION, true, b"x", m),
            FrameError::Continuation,
        ),
        (
            [
                frame(OP_BINARY, false, b"a", m),
                frame(OP_BINARY, true, b"b", m),
            ]
            .concat(),
            FrameError::Interleaved,
        ),
        (huge, FrameError::Length),
        (frame(OP_CLOSE, true, &[3], m), FrameError::Close),
    ];
    for (input, expected) in cases {
        let mut d = Decoder::new();
        assert_eq!(decode_in_chunks(&mut d, &input, &[]), Err(expected));
        assert_eq!(
            expected.close_code(),
            if expected == FrameError::Text {
                1003
            } else {
                1002
            }
        );
    }
}

#[test]
fn a_close_frame_ends_the_stream_and_is_echoed() {
    let m = [9, 8, 7, 6];
    let input = [
        binary(b"before"),
        frame(OP_CLOSE, true, &1001u16.to_be_bytes(), m),
        binary(b"after"),
    ]
    .concat();
    let mut d = Decoder::new();
    assert_eq!(decode_in_chunks(&mut d, &input, &[]).unwrap(), b"before");
    assert!(d.is_closed());
    let reply = d.close.unwrap();
    assert_eq!(reply.unsent(), [0x88, 2, 0x03, 0xe9]);
}

#[test]
fn the_latest_ping_is_answered() {
    let m = [5, 5, 5, 5];
    let input = [
        frame(OP_PING, true, b"one", m),
        binary(b"data"),
        frame(OP_PING, true, b"two", m),
        frame(OP_PONG, true, b"ignored", m),
    ]
    .concat();
    let mut d = Decoder::new();
    assert_eq!(decode_in_chunks(&mut d, &input, &[2, 7]).unwrap(), b"data");
    assert_eq!(d.pong.unwrap().unsent(), b"\x8a\x03two");
}

proptest! {
    /// A byte stream cut into frames anywhere (one message or many, pings between frames),
    /// and the frames delivered in chunks cut anywhere, decodes to the same byte stream.
    #[test]
    fn frames_and_reads_cut_anywhere_give_the_stream(
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        frame_cuts in proptest::collection::vec(0usize..3000, 0..8),
        read_cuts in proptest::collection::vec(0usize..3200, 0..12),
        one_message in any::<bool>(),
        pings in any::<bool>(),
        mask in any::<[u8; 4]>(),
    ) {
        let mut cuts: Vec<usize> = frame_cuts.into_iter().filter(|&c| c < payload.len()).collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts.push(payload.len());
        let mut input = Vec::new();
        let mut from = 0;
        for (i, &cut) in cuts.iter().enumerate() {
            let last = i + 1 == cuts.len();
            let (opcode, fin) = if one_message {
                (if i == 0 { OP_BINARY } else { OP_CONTINUATION }, last)
            } else {
                (OP_BINARY, true)
            };
            input.extend(frame(opcode, fin, &payload[from..cut], mask));
            if pings {
                input.extend(frame(OP_PING, true, &[i as u8], mask));
            }
            from = cut;
        }
        let mut d = Decoder::new();
        let out = decode_in_chunks(&mut d, &input, &read_cuts).unwrap();
        prop_assert_eq!(out, payload);
        prop_assert_eq!(d.pong.is_some(), pings);
        prop_assert!(!d.fragmented);
    }

    #[test]
    fn any_bytes_decode_without_panicking(
        input in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(0usize..400, 0..5),
    ) {
        let mut d = Decoder::new();
        let _ = decode_in_chunks(&mut d, &input, &cuts);
    }

    #[test]
    fn unmasking_at_any_offset_matches_bytewise(
        data in proptest::collection::vec(any::<u8>(), 0..64),
        mask in any::<[u8; 4]>(),
        offset in 0usize..4,
    ) {
        let mut fast = data.clone();
        unmask(&mut fast, mask, offset);
        let slow: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[(i + offset) % 4]).collect();
        prop_assert_eq!(fast, slow);
    }
}

// ---- The upgrade request ----------------------------------------------------------------

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request(path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn check(req: &[u8], trust_proxy: bool) -> Result<Option<(usize, String, Upgraded)>, Refusal> {
    check_request(req, "/mqtt", trust_proxy)
}

#[test]
fn the_rfc_example_key_is_accepted() {
    let (len, accept, up) = check(&request("/mqtt", ""), false).unwrap().unwrap();
    assert_eq!(len, request("/mqtt", "").len());
    // RFC 6455, 1.3.
    assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_eq!(up.subprotocol, None);
}

#[test]
fn subprotocols_are_negotiated_in_the_clients_order() {
    for (offer, chosen) in [
        ("Sec-WebSocket-Protocol: mqtt\r\n", "mqtt"),
        ("Sec-WebSocket-Protocol: mqttv3.1\r\n", "mqttv3.1"),
        (
            "Sec-WebSocket-Protocol: chat, mqttv3.1, mqtt\r\n",
            "mqttv3.1",
        ),
        (
            "Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: mqtt\r\n",
            "mqtt",
        ),
    ] {
        let (_, _, up) = check(&request("/mqtt", offer), false).unwrap().unwrap();
        assert_eq!(up.subprotocol, Some(chosen), "{offer}");
    }
    assert!(matches!(
        check(
            &request("/mqtt", "Sec-WebSocket-Protocol: chat, MQTT\r\n"),
            false
        ),
        Err(Refusal::Subprotocol(_))
    ));
}

#[test]
fn bad_requests_are_refused_with_their_status() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (request("/other", ""), "404"),
        (request("/mqttx", ""), "404"),
        (b"POST /mqtt HTTP/1.1\r\n\r\n".to_vec(), "405"),
        (b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "426"),
        (b"GET /mqtt HTTP/1.0\r\n\r\n".to_vec(), "400"),
        (
            b"\x10\x0c\x00\x04MQTT\x05\x02\x00\x3c\r\n\r\n".to_vec(),
            "400",
        ),
        (
            request("/mqtt", "")
                .into_iter()
                .map(|b| if b == b'3' { b'2' } else { b })
                .collect(),
            "426",
        ),
        (
            String::from_utf8(request("/mqtt", ""))
                .unwrap()
                .replace(KEY, "short")
                .into_bytes(),
            "400",
        ),
        (request("/mqtt", &"X-A: b\r\n".repeat(MAX_HEADERS)), "431"),
    ];
    for (req, status) in cases {
        let refusal = check(&req, false).unwrap_err();
        assert!(
            refusal
                .response()
                .starts_with(&format!("HTTP/1.1 {status} ")),
            "{refusal:?} for {:?}",
            String::from_utf8_lossy(&req)
        );
    }
    // A query and a trailing slash are fine; an incomplete request waits.
    assert!(check(&request("/mqtt?x=1", ""), false).unwrap().is_some());
    assert!(check(&request("/mqtt/", ""), false).unwrap().is_some());
    let full = request("/mqtt", "");
    assert!(check(&full[..full.len() - 1], false).unwrap().is_none());
}

#[test]
fn forwarded_for_is_read_only_when_the_proxy_is_trusted() {
    let req = request("/mqtt", "X-Forwarded-For: 203.0.113.9, 10.0.0.2\r\n");
    let ip = |req: &[u8], trust| check(req, trust).unwrap().unwrap().2.forwarded_for;
    assert_eq!(ip(&req, true), Some("203.0.113.9".parse().unwrap()));
    assert_eq!(ip(&req, false), None);
    for (value, expected) in [
        ("2001:db8::9", Some("2001:db8::9")),
        ("[2001:db8::9]", Some("2001:db8::9")),
        ("[2001:db8::9]:4711", Some("2001:db8::9")),
        ("203.0.113.9:4711", Some("203.0.113.9")),
        ("unknown", None),
        ("", None),
    ] {
        let req = request("/mqtt", &format!("X-Forwarded-For: {value}\r\n"));
        assert_eq!(
            ip(&req, true),
            expected.map(|e| e.parse().unwrap()),
            "{value}"
        );
    }
}

#[test]
fn forwarded_names_the_client_only_when_the_proxy_is_trusted() {
    let ip = |req: &[u8], trust| check(req, trust).unwrap().unwrap().2.forwarded_for;
    let req = request(
        "/mqtt",
        "Forwarded: for=192.0.2.60;proto=http;by=203.0.113.43\r\n",
    );
    assert_eq!(ip(&req, true), Some("192.0.2.60".parse().unwrap()));
    assert_eq!(ip(&req, false), None);
    // RFC 7239's examples and the forms around them; the first element is the client-most.
    for (value, expected) in [
        ("for=192.0.2.43", Some("192.0.2.43")),
        ("For=\"192.0.2.43:47011\"", Some("192.0.2.43")),
        ("for=\"[2001:db8:cafe::17]\"", Some("2001:db8:cafe::17")),
        (
            "for=\"[2001:db8:cafe::17]:4711\"",
            Some("2001:db8:cafe::17"),
        ),
        ("for=192.0.2.43, for=198.51.100.17", Some("192.0.2.43")),
        (
            "for=192.0.2.43,for=\"[2001:db8:cafe::17]\"",
            Some("192.0.2.43"),
        ),
        (
            "proto=https; by=10.0.0.1 ; for=192.0.2.43",
            Some("192.0.2.43"),
        ),
        ("by=\"a;b,c\";for=192.0.2.43", Some("192.0.2.43")),
        ("for=\"192.0.2.43:_port-1\"", Some("192.0.2.43")),
        ("for=\"\\192.0.2.43\"", Some("192.0.2.43")),
        // Obfuscated, unknown, or in a later element only: no address.
        ("for=_hidden, for=198.51.100.17", None),
        ("for=unknown", None),
        ("for=\"_SEVKISEK\"", None),
        ("by=10.0.0.1, for=198.51.100.17", None),
        // Malformed: ignored, the socket's address stands.
        ("for=2001:db8:cafe::17", None),
        ("for=\"[2001:db8:cafe::17\"", None),
        ("for=\"192.0.2.43", None),
        ("for=192.0.2.43:99999", None),
        ("for=192.0.2.43:", None),
        ("for=192.0.2.43:_", None),
        ("for=192.0.2.43;for=198.51.100.17", None),
        ("for", None),
        ("for=", None),
        ("for=999.0.2.43", None),
        ("", None),
    ] {
        let req = request("/mqtt", &format!("Forwarded: {value}\r\n"));
        assert_eq!(
            ip(&req, true),
            expected.map(|e| e.parse().unwrap()),
            "{value}"
        );
    }
    // Forwarded first; X-Forwarded-For when Forwarded names no client.
    let both = "Forwarded: for=192.0.2.1\r\nX-Forwarded-For: 198.51.100.2\r\n";
    assert_eq!(
        ip(&request("/mqtt", both), true),
        Some("192.0.2.1".parse().unwrap())
    );
    let hidden = "Forwarded: for=_hidden\r\nX-Forwarded-For: 198.51.100.2\r\n";
    assert_eq!(
        ip(&request("/mqtt", hidden), true),
        Some("198.51.100.2".parse().unwrap())
    );
    assert_eq!(ip(&request("/mqtt", both), false), None);
}

// ---- The stream -----------------------------------------------------------------------------

fn pair() -> (WsStream<DuplexStream>, DuplexStream) {
    let (server, client) = tokio::io::duplex(256 * 1024);
    (WsStream::new(Prefixed::new(server, b"")), client)
}

async fn read_frames(client: &mut DuplexStream) -> Vec<Frame> {
    let mut bytes = Vec::new();
    client.read_to_end(&mut bytes).await.unwrap();
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((f, n)) = parse_server_frame(&bytes[at..]) {
        frames.push(f);
        at += n;
    }
    assert_eq!(at, bytes.len(), "trailing bytes");
    frames
}

#[tokio::test]
async fn writes_go_out_as_binary_frames_and_shutdown_closes() {
    let (mut ws, mut client) = pair();
    ws.write_all(b"hello").await.unwrap();
    let big = vec![7u8; MAX_OUT_FRAME + 10];
    ws.write_all(&big).await.unwrap();
    ws.shutdown().await.unwrap();
    drop(ws);
    let frames = read_frames(&mut client).await;
    let data: Vec<u8> = frames
        .iter()
        .filter(|f| f.1 == OP_BINARY)
        .flat_map(|f| f.2.clone())
        .collect();
    assert_eq!(data, [b"hello".as_slice(), &big].concat());
    assert!(frames.iter().all(|f| f.0), "every frame is final");
    assert!(frames.iter().all(|f| f.2.len() <= MAX_OUT_FRAME));
    assert_eq!(frames.last().unwrap(), &(true, OP_CLOSE, vec![0x03, 0xe8]));
}

#[tokio::test]
async fn pings_are_answered_while_only_reading_and_close_is_echoed() {
    let (mut ws, mut client) = pair();
    let m = [1, 2, 3, 4];
    client
        .write_all(
            &[
                frame(OP_PING, true, b"hi", m),
                frame(OP_CLOSE, true, &1000u16.to_be_bytes(), m),
            ]
            .concat(),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        ws.read(&mut buf).await.unwrap(),
        0,
        "the close frame ends the stream"
    );
    ws.shutdown().await.unwrap();
    drop(ws);
    let frames = read_frames(&mut client).await;
    assert_eq!(
        frames,
        vec![
            (true, OP_PONG, b"hi".to_vec()),
            (true, OP_CLOSE, vec![0x03, 0xe8]),
        ],
        "one pong, one close: shutdown adds no second close"
    );
}

#[tokio::test]
async fn a_text_frame_fails_the_read_and_closes_with_1003() {
    let (mut ws, mut client) = pair();
    client
        .write_all(&[binary(b"ok"), frame(OP_TEXT, true, b"{}", [1, 1, 1, 1])].concat())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = ws.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"ok");
    let err = ws.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    ws.shutdown().await.unwrap();
    drop(ws);
    let frames = read_frames(&mut client).await;
    assert_eq!(frames, vec![(true, OP_CLOSE, vec![0x03, 0xeb])]);
}

#[tokio::test]
async fn bytes_after_the_request_are_decoded_first() {
    let (server, mut client) = tokio::io::duplex(1024);
    let mut ws = WsStream::new(Prefixed::new(server, &binary(b"early")));
    client.write_all(&binary(b" late")).await.unwrap();
    let mut out = vec![0u8; 10];
    ws.read_exact(&mut out).await.unwrap();
    assert_eq!(out, b"early late");
}
