//! The PROXY protocol (HAProxy's, text version 1 and binary version 2): the header a load
//! balancer sends ahead of the client's bytes to say whom it is forwarding. Listeners with
//! `proxy_protocol` read it before anything else (on TLS listeners, before the handshake),
//! in the connection's task and under its CONNECT deadline, and refuse a connection that
//! does not start with a valid one.
//!
//! The header is found by its framing alone (the v1 line's CRLF within 107 bytes, the v2
//! length field within [`V2_MAX`]) and then parsed from exactly those bytes, by slices and
//! `get`, never by indexing on what the peer sent. Bytes read past the header stay in front of
//! the stream ([`Prefixed`]). The specification:
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::prefixed::Prefixed;

/// How a version 1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest version 1 header, CRLF included (the specification's limit).
const V1_MAX: usize = 107;
/// How a version 2 header starts.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a version 2 header: the signature, version and command, family and
/// protocol, and the length of the rest.
const V2_FIXED: usize = 16;
/// The longest version 2 header accepted, TLVs included. Load balancers send the addresses
/// (36 bytes for IPv6) and a few TLVs (a connection ID, TLS details, a cloud endpoint ID):
/// well within this. What a connection may hold before it said who it is stays small.
const V2_MAX: usize = 2048;

/// Whom a PROXY header says the connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxiedAddr {
    /// A client, at this address as the proxy saw it.
    Client(SocketAddr),
    /// The proxy itself (a v2 `LOCAL` command, as health checks send; v1 `UNKNOWN`; a v2
    /// header without IP addresses): the socket's address stands.
    Local,
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ProxyHeaderError {
    /// The connection ended before the header did.
    #[error("connection closed before the PROXY header ended")]
    Closed,
    /// Reading failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    /// The connection starts with something else.
    #[error("the connection does not start with a PROXY header")]
    Missing,
    /// The header does not end within the limit.
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    /// A version 1 header that does not parse.
    #[error("invalid PROXY v1 header: {0}")]
    V1(&'static str),
    /// A version 2 header that does not parse.
    #[error("invalid PROXY v2 header: {0}")]
    V2(&'static str),
}

/// Reads the PROXY header at the start of `stream`: whom it names, and the stream positioned
/// just after it. Reads at most [`V2_MAX`] bytes, in a buffer that grows only as they come.
pub(crate) async fn read_proxy_header<S: AsyncRead + Unpin>(
    mut stream: S,
) -> Result<(Prefixed<S>, ProxiedAddr), ProxyHeaderError> {
    // Enough for a v1 header and for most v2 ones in one read.
    let mut buf = Vec::with_capacity(V1_MAX + 1);
    loop {
        if let Some(len) = header_len(&buf)? {
            let (header, rest) = buf.split_at_checked(len).ok_or(ProxyHeaderError::Missing)?;
            let addr = parse(header)?;
            return Ok((Prefixed::new(stream, rest), addr));
        }
        let room = V2_MAX.saturating_sub(buf.len());
        if room == 0 {
            return Err(ProxyHeaderError::TooLong(V2_MAX));
        }
        if stream.read_buf(&mut (&mut buf).limit(room)).await? == 0 {
            return Err(ProxyHeaderError::Closed);
        }
    }
}

/// The length of the header that `buf` starts with; `None` while `buf` is a beginning of one.
/// Fails as soon as the bytes seen cannot start a header, so that a client that does not
/// speak the protocol is refused at its first packet.
fn header_len(buf: &[u8]) -> Result<Option<usize>, ProxyHeaderError> {
    if agrees(buf, V2_SIGNATURE) {
        let (Some(&hi), Some(&lo)) = (buf.get(V2_FIXED - 2), buf.get(V2_FIXED - 1)) else {
            return Ok(None);
        };
        let total = V2_FIXED + usize::from(u16::from_be_bytes([hi, lo]));
        if total > V2_MAX {
            return Err(ProxyHeaderError::TooLong(V2_MAX));
        }
        return Ok((buf.len() >= total).then_some(total));
    }
    if agrees(buf, V1_PREFIX) {
        let window = buf.get(..V1_MAX).unwrap_or(buf);
        if let Some(cr) = window.windows(2).position(|w| w == b"\r\n") {
            return Ok(Some(cr + 2));
        }
        if buf.len() >= V1_MAX {
            return Err(ProxyHeaderError::TooLong(V1_MAX));
        }
        return Ok(None);
    }
    Err(ProxyHeaderError::Missing)
}

/// Whether `buf` and `signature` agree as far as both go.
fn agrees(buf: &[u8], signature: &[u8]) -> bool {
    buf.iter().zip(signature).all(|(a, b)| a == b)
}

/// Parses one complete header, exactly as [`header_len`] delimited it.
fn parse(header: &[u8]) -> Result<ProxiedAddr, ProxyHeaderError> {
    if header.starts_with(V2_SIGNATURE) {
        parse_v2(header).map_err(ProxyHeaderError::V2)
    } else {
        parse_v1(header).map_err(ProxyHeaderError::V1)
    }
}

/// `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n`, or `PROXY UNKNOWN[ ...]\r\n`.
fn parse_v1(header: &[u8]) -> Result<ProxiedAddr, &'static str> {
    let line = header
        .strip_suffix(b"\r\n")
        .and_then(|l| std::str::from_utf8(l).ok())
        .ok_or("not an ASCII line ending in CRLF")?;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err("no PROXY prefix");
    }
    let protocol = fields.next().ok_or("no protocol")?;
    if protocol == "UNKNOWN" {
        // The rest, if any, is to be ignored.
        return Ok(ProxiedAddr::Local);
    }
    let (Some(src), Some(_dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err("expected four address fields");
    };
    let ip: IpAddr = match protocol {
        "TCP4" => src
            .parse::<Ipv4Addr>()
            .map_err(|_| "bad IPv4 source")?
            .into(),
        "TCP6" => src
            .parse::<Ipv6Addr>()
            .map_err(|_| "bad IPv6 source")?
            .into(),
        _ => return Err("unknown protocol"),
    };
    let port = parse_port(sport).ok_or("bad source port")?;
    parse_port(dport).ok_or("bad destination port")?;
    Ok(ProxiedAddr::Client(SocketAddr::new(ip, port)))
}

/// A port in decimal, without leading zeros.
fn parse_port(text: &str) -> Option<u16> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

/// The binary header: signature, version and command, family and transport, length,
/// addresses, TLVs (ignored).
fn parse_v2(header: &[u8]) -> Result<ProxiedAddr, &'static str> {
    let fixed = header.get(..V2_FIXED).ok_or("shorter than 16 bytes")?;
    let (Some(&version_command), Some(&family_transport)) = (fixed.get(12), fixed.get(13)) else {
        return Err("shorter than 16 bytes");
    };
    if version_command >> 4 != 2 {
        return Err("not version 2");
    }
    let proxy = match version_command & 0x0f {
        0x0 => false,
        0x1 => true,
        _ => return Err("unknown command"),
    };
    if family_transport & 0x0f > 2 {
        return Err("unknown transport");
    }
    let addresses = header.get(V2_FIXED..).unwrap_or_default();
    let short = "addresses shorter than their family";
    let client = match family_transport >> 4 {
        // AF_INET: source, destination, source port, destination port.
        0x1 => {
            let src: [u8; 4] = addresses
                .get(0..4)
                .ok_or(short)?
                .try_into()
                .map_err(|_| short)?;
            let port: [u8; 2] = addresses
                .get(8..10)
                .ok_or(short)?
                .try_into()
                .map_err(|_| short)?;
            Some(SocketAddr::new(
                Ipv4Addr::from(src).into(),
                u16::from_be_bytes(port),
            ))
        }
        // AF_INET6.
        0x2 => {
            let src: [u8; 16] = addresses
                .get(0..16)
                .ok_or(short)?
                .try_into()
                .map_err(|_| short)?;
            let port: [u8; 2] = addresses
                .get(32..34)
                .ok_or(short)?
                .try_into()
                .map_err(|_| short)?;
            Some(SocketAddr::new(
                Ipv6Addr::from(src).into(),
                u16::from_be_bytes(port),
            ))
        }
        // AF_UNSPEC, AF_UNIX: no IP address to take.
        0x0 | 0x3 => None,
        _ => return Err("unknown address family"),
    };
    // A LOCAL header comes from the proxy itself: its addresses, if any, are to be ignored.
    Ok(match client {
        Some(addr) if proxy => ProxiedAddr::Client(addr),
        _ => ProxiedAddr::Local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use tokio::io::AsyncWriteExt;

    /// A version 2 header: `command` 0 (LOCAL) or 1 (PROXY), family byte, addresses, TLVs.
    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        let len = u16::try_from(addresses.len() + tlvs.len()).unwrap();
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    fn v2_ipv4(src: [u8; 4], port: u16) -> Vec<u8> {
        let mut a = src.to_vec();
        a.extend_from_slice(&[10, 0, 0, 1]);
        a.extend_from_slice(&port.to_be_bytes());
        a.extend_from_slice(&1883u16.to_be_bytes());
        v2(1, 0x11, &a, &[])
    }

    fn addr(s: &str) -> ProxiedAddr {
        ProxiedAddr::Client(s.parse().unwrap())
    }

    #[test]
    fn version_1_headers() {
        for (header, expected) in [
            (
                &b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 1883\r\n"[..],
                addr("192.0.2.7:51000"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 443 1883\r\n",
                addr("[2001:db8::7]:443"),
            ),
            (b"PROXY UNKNOWN\r\n", ProxiedAddr::Local),
            (
                b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
                ProxiedAddr::Local,
            ),
        ] {
            let mut input = header.to_vec();
            input.extend_from_slice(b"\x10rest");
            assert_eq!(header_len(&input).unwrap(), Some(header.len()));
            assert_eq!(parse(header).unwrap(), expected);
        }
    }

    #[test]
    fn version_2_headers() {
        let h = v2_ipv4([192, 0, 2, 7], 51000);
        assert_eq!(header_len(&h).unwrap(), Some(28));
        assert_eq!(parse(&h).unwrap(), addr("192.0.2.7:51000"));

        let mut a = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)
            .octets()
            .to_vec();
        a.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        a.extend_from_slice(&[0, 80, 7, 91]);
        // With a NOOP TLV and a unique-ID TLV after the addresses.
        let h = v2(1, 0x21, &a, &[0x04, 0, 1, 0, 0x05, 0, 3, b'a', b'b', b'c']);
        assert_eq!(parse(&h).unwrap(), addr("[2001:db8::7]:80"));

        // LOCAL (a health check): whatever the addresses, the socket's address stands.
        let mut local = v2_ipv4([192, 0, 2, 7], 1);
        local[12] = 0x20;
        assert_eq!(parse(&local).unwrap(), ProxiedAddr::Local);
        assert_eq!(parse(&v2(1, 0x00, &[], &[])).unwrap(), ProxiedAddr::Local);
        // A UNIX socket has no IP address to take.
        assert_eq!(
            parse(&v2(1, 0x31, &[0; 216], &[])).unwrap(),
            ProxiedAddr::Local
        );
        // An unknown family or transport is refused.
        assert!(parse(&v2(1, 0x41, &[0; 12], &[])).is_err());
        assert!(parse(&v2(1, 0x13, &[0; 12], &[])).is_err());
    }

    #[test]
    fn every_beginning_of_a_header_waits_for_more() {
        for header in [
            v2_ipv4([1, 2, 3, 4], 5),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        ] {
            for end in 0..header.len() {
                assert_eq!(header_len(&header[..end]).unwrap(), None, "{end}");
            }
            assert_eq!(header_len(&header).unwrap(), Some(header.len()));
        }
    }

    #[test]
    fn garbage_and_oversized_headers_are_refused() {
        // An MQTT CONNECT from a client that did not go through the proxy.
        assert!(matches!(
            header_len(b"\x10\x0c\x00\x04MQTT"),
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            header_len(b"PROXX"),
            Err(ProxyHeaderError::Missing)
        ));
        assert!(matches!(
            header_len(b"\r\n\r\n\0\r\nQUIX"),
            Err(ProxyHeaderError::Missing)
        ));
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(
            header_len(&long),
            Err(ProxyHeaderError::TooLong(V1_MAX))
        ));
        let mut huge = v2(1, 0x11, &[0; 12], &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            header_len(&huge),
            Err(ProxyHeaderError::TooLong(V2_MAX))
        ));
        // Delimited, but wrong inside.
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 1\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // An IPv4 header too short for its addresses; a version 3; an unknown command.
        assert!(parse(&v2(1, 0x11, &[1, 2, 3], &[])).is_err());
        let mut v3 = v2_ipv4([1, 2, 3, 4], 5);
        v3[12] = 0x31;
        assert!(parse(&v3).is_err());
        let mut cmd = v2_ipv4([1, 2, 3, 4], 5);
        cmd[12] = 0x2f;
        assert!(parse(&cmd).is_err());
    }

    #[tokio::test]
    async fn the_stream_continues_after_the_header() {
        let (a, mut b) = tokio::io::duplex(256);
        let mut input = b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 1883\r\n".to_vec();
        input.extend_from_slice(b"after");
        b.write_all(&input).await.unwrap();
        drop(b);
        let (mut s, who) = read_proxy_header(a).await.unwrap();
        assert_eq!(who, addr("192.0.2.7:51000"));
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn a_connection_that_ends_early_is_refused() {
        let (a, mut b) = tokio::io::duplex(256);
        b.write_all(b"PROXY TCP4 1.2").await.unwrap();
        drop(b);
        assert!(matches!(
            read_proxy_header(a).await,
            Err(ProxyHeaderError::Closed)
        ));
    }

    /// Feeds `input` to [`read_proxy_header`] in chunks ending at `cuts`.
    fn read_in_chunks(
        input: Vec<u8>,
        mut cuts: Vec<usize>,
    ) -> (Result<ProxiedAddr, String>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (a, mut b) = tokio::io::duplex(64 * 1024);
            cuts.retain(|&c| c < input.len());
            cuts.sort_unstable();
            let writer = async move {
                let mut from = 0;
                for cut in cuts.into_iter().chain([input.len()]) {
                    let _ = b.write_all(&input[from..cut]).await;
                    let _ = b.flush().await;
                    tokio::task::yield_now().await;
                    from = cut;
                }
            };
            let reader = async move {
                match read_proxy_header(a).await {
                    Ok((mut s, who)) => {
                        let mut rest = Vec::new();
                        let _ = s.read_to_end(&mut rest).await;
                        (Ok(who), rest)
                    }
                    Err(e) => (Err(e.to_string()), Vec::new()),
                }
            };
            let ((), out) = tokio::join!(writer, reader);
            out
        })
    }

    proptest! {
        #[test]
        fn any_bytes_are_handled_without_panicking(
            input in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let _ = header_len(&input);
            let _ = parse(&input);
        }

        #[test]
        fn near_valid_headers_are_handled_without_panicking(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            command in 0u8..16,
            family in any::<u8>(),
            len in any::<u16>(),
        ) {
            let mut h = V2_SIGNATURE.to_vec();
            h.push(0x20 | command);
            h.push(family);
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&body);
            if let Ok(Some(n)) = header_len(&h) {
                let _ = parse(&h[..n]);
            }
            let mut t = b"PROXY TCP4 ".to_vec();
            t.extend_from_slice(&body);
            if let Ok(Some(n)) = header_len(&t) {
                let _ = parse(&t[..n]);
            }
        }

        #[test]
        fn a_header_split_anywhere_gives_the_client_and_the_rest(
            ip in any::<[u8; 4]>(),
            port in any::<u16>(),
            text in any::<bool>(),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(0usize..128, 0..6),
        ) {
            let mut input = if text {
                format!("PROXY TCP4 {} 10.0.0.1 {port} 1883\r\n", Ipv4Addr::from(ip)).into_bytes()
            } else {
                v2_ipv4(ip, port)
            };
            input.extend_from_slice(&rest);
            let (who, after) = read_in_chunks(input, cuts);
            prop_assert_eq!(
                who,
                Ok(ProxiedAddr::Client(SocketAddr::new(IpAddr::V4(ip.into()), port)))
            );
            prop_assert_eq!(after, rest);
        }
    }
}
