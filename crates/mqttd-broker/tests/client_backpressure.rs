//! `mqttd-client` does not read faster than its application consumes: while the application
//! leaves events waiting, the connection stops reading the socket, so what the server sends
//! stays in the TCP window and the server's queue instead of the client's memory. Once the
//! application consumes, every QoS 1 message arrives, in order, exactly once.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_client::{connect, connect_tcp, EVENT_QUEUE};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::session::Enqueued;
use mqttd_proto::{ClientId, Message, QoS, TopicFilter, TopicName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Messages published while the subscriber's application does not consume: several times
/// what the client may hold.
const MESSAGES: usize = 5 * EVENT_QUEUE;
const PAYLOAD: usize = 100;
/// Generous: only a hang reaches it.
const WAIT: Duration = Duration::from_secs(60);

/// A stream that counts the bytes read from it.
struct Counting {
    inner: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn message(payload: Vec<u8>) -> Message {
    Message::new(
        TopicName::try_from("t").unwrap(),
        payload,
        QoS::AtLeastOnce,
        false,
    )
}

fn numbered(i: usize) -> Message {
    let mut payload = format!("{i:08}").into_bytes();
    payload.resize(PAYLOAD, b'.');
    message(payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_application_is_behind_stops_reading_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.listen = vec!["tcp://127.0.0.1:0".into()];
    config.data_dir = dir.path().join("data");
    config.persistence = false;
    // The broker keeps everything the subscriber has not read yet.
    config.max_queued_messages = 10 * MESSAGES;
    let broker = Broker::builder(config).start().await.unwrap();
    let addr = broker.addr(ListenerKind::Tcp).unwrap();

    let read = Arc::new(AtomicU64::new(0));
    let stream = Counting {
        inner: TcpStream::connect(addr).await.unwrap(),
        read: read.clone(),
    };
    let config = ClientConfig::new(ClientId::try_from("slow").unwrap());
    let (sub, mut events, _) = connect(stream, config, None).await.unwrap();
    sub.subscribe_one(TopicFilter::try_from("t").unwrap(), QoS::AtLeastOnce)
        .await
        .unwrap();

    let config = ClientConfig::new(ClientId::try_from("publisher").unwrap());
    let (publisher, mut confirmations, _) = connect_tcp(addr, config, None).await.unwrap();
    let publishing = tokio::spawn(async move {
        for i in 0..MESSAGES {
            let outcome = publisher.publish(numbered(i)).await.unwrap();
            assert!(
                matches!(outcome, Enqueued::Sent | Enqueued::Queued),
                "{outcome:?}"
            );
        }
        let mut confirmed = 0;
        while confirmed < MESSAGES {
            match confirmations.recv().await {
                Some(Event::Delivered { reason, .. }) => {
                    assert!(!reason.is_error(), "{reason}");
                    confirmed += 1;
                }
                Some(_) => {}
                None => panic!("publisher connection closed"),
            }
        }
        (publisher, confirmations)
    });
    let (publisher, _confirmations) = tokio::time::timeout(WAIT, publishing)
        .await
        .expect("the broker takes every message although the subscriber is behind")
        .unwrap();

    // The application has consumed nothing. Each PUBLISH is 2 + 3 + 2 + 1 + PAYLOAD bytes
    // (MQTT 5, no properties); the client may hold a full event stream, the packets of one
    // read (its 16 KiB buffer) and the CONNACK and SUBACK.
    let packet = (8 + PAYLOAD) as u64;
    let bound = (EVENT_QUEUE as u64 + 1) * packet + 64 * 1024;
    let mut peak = 0;
    let watch = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < watch {
        peak = peak.max(events.queued());
        let bytes = read.load(Ordering::Relaxed);
        assert!(
            events.queued() <= EVENT_QUEUE,
            "{} events wait for the application (limit {EVENT_QUEUE})",
            events.queued()
        );
        assert!(
            bytes <= bound,
            "the client read {bytes} bytes the application did not consume (bound {bound})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(peak > 0, "the subscriber received nothing at all");

    // Now the application consumes: everything arrives, in order, once.
    for i in 0..MESSAGES {
        let publish = tokio::time::timeout(WAIT, events.next_message())
            .await
            .expect("the rest arrives once the application consumes")
            .expect("the connection stays up");
        assert_eq!(&publish.message.payload[..8], format!("{i:08}").as_bytes());
    }
    // A marker proves nothing else (no duplicate) was waiting before it.
    let _ = publisher
        .publish(message(b"marker".to_vec()))
        .await
        .unwrap();
    let next = tokio::time::timeout(WAIT, events.next_message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&next.message.payload[..], b"marker");
    broker.shutdown().await;
}
