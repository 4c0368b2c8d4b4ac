//! QoS 0 fan-in overload: publishers faster than the broker must not make it read everything
//! and drop most of it.
//!
//! Raw publishers write pre-encoded QoS 0 PUBLISH packets in 64 KiB writes as fast as TCP takes
//! them; one subscriber to `bench/#` reads 64 KiB at a time. When the subscriber's output is
//! congested, the broker is to slow its reading of the publishers that feed it, so that what it
//! reads it delivers, whatever the number of publishers. Before it did, one publisher left the
//! subscriber ~740k msg/s and two or more left it 34-64k, with 97-99% dropped.
//!
//! The verdict does not depend on how busy the machine is: messages delivered per second of the
//! broker's CPU time (not per wall-clock second) with 2, 4 and 8 publishers must each be at
//! least 80% of the figure with one. A broker that reads and then drops spends its CPU on
//! messages nobody receives, which this measure catches however slow the machine is. And what
//! the broker drops (its own counter) stays below a tenth of what it delivers: the subscriber
//! reads, so dropping is not called for.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mqttd_proto::{Packet, ProtocolVersion, Publish, PublishProperties, QoS, TopicName};

use support::{connect_packet, encode, subscribe_packet, Broker};

const PAYLOAD: usize = 64;
/// How long each publisher count is measured, after `WARM_UP`.
const WINDOW: Duration = Duration::from_secs(2);
const WARM_UP: Duration = Duration::from_millis(500);
/// Deadline for any single socket operation: only a hung broker reaches it.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const DROPPED: &str = "mqttd_messages_dropped_total";

fn publish_packet() -> Vec<u8> {
    let publish = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: TopicName::try_from("bench/t").expect("valid topic"),
        packet_id: None,
        properties: PublishProperties::default(),
        payload: vec![b'x'; PAYLOAD].into(),
    };
    encode(ProtocolVersion::V3_1_1, &Packet::Publish(publish))
}

/// Opens a connection and completes CONNECT/CONNACK (3.1.1, whose CONNACK is 4 bytes).
fn connect(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to the broker");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
        .write_all(&encode(
            ProtocolVersion::V3_1_1,
            &connect_packet(ProtocolVersion::V3_1_1, client_id),
        ))
        .expect("send CONNECT");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).expect("read CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");
    stream
}

/// Counts the messages the subscriber received: every delivery is the same packet, so bytes
/// divided by its size.
struct Subscriber {
    bytes: Arc<AtomicU64>,
    packet_len: u64,
}

impl Subscriber {
    fn start(addr: SocketAddr, packet_len: usize) -> Self {
        let mut stream = connect(addr, "overload-sub");
        stream
            .write_all(&encode(
                ProtocolVersion::V3_1_1,
                &subscribe_packet(1, "bench/#", QoS::AtMostOnce),
            ))
            .expect("send SUBSCRIBE");
        let mut suback = [0u8; 5];
        stream.read_exact(&mut suback).expect("read SUBACK");
        assert_eq!(
            suback,
            [0x90, 0x03, 0x00, 0x01, 0x00],
            "SUBACK granting QoS 0"
        );
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        Self {
            bytes,
            packet_len: packet_len as u64,
        }
    }

    fn received(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed) / self.packet_len
    }
}

/// Publishers writing pre-encoded QoS 0 packets as fast as the broker's socket takes them.
struct Publishers {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Publishers {
    fn start(addr: SocketAddr, count: usize, chunk: &Arc<Vec<u8>>, round: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|i| {
                let mut stream = connect(addr, &format!("overload-pub-{round}-{i}"));
                let (stop, chunk) = (stop.clone(), chunk.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if stream.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("publisher thread");
        }
    }
}

/// Pins every thread of process `pid` to CPU `cpu` (threads it starts later inherit it).
fn pin(pid: u32, cpu: u32) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run taskset (util-linux)");
    assert!(status.success(), "taskset failed for pid {pid}");
}

#[test]
fn qos0_fan_in_overload_delivers_what_it_reads() {
    let broker = Broker::start("");
    // One core for the broker, the other for this load generator: the broker's CPU time per
    // message then measures its work, not how much of it ran in parallel on both cores (which
    // costs more per message, with publishers or without).
    pin(broker.pid(), 0);
    pin(std::process::id(), 1);
    let packet = publish_packet();
    let chunk: Arc<Vec<u8>> = Arc::new(packet.repeat(64 * 1024 / packet.len()));
    let sub = Subscriber::start(broker.mqtt, packet.len());

    let mut per_cpu = Vec::new();
    for (round, count) in [1usize, 2, 4, 8].into_iter().enumerate() {
        let publishers = Publishers::start(broker.mqtt, count, &chunk, round);
        thread::sleep(WARM_UP);
        let dropped0 = broker.metrics().get(DROPPED);
        let (cpu0, got0) = (broker.cpu_time(), sub.received());
        thread::sleep(WINDOW);
        let (cpu1, got1) = (broker.cpu_time(), sub.received());
        let dropped = broker.metrics().get(DROPPED) - dropped0;
        publishers.stop();
        let delivered = got1 - got0;
        // Dropping is the last resort, for a subscriber that stopped reading; this one reads.
        assert!(
            dropped <= delivered as f64 / 10.0,
            "{count} publishers: {dropped} dropped against {delivered} delivered"
        );
        let cpu = (cpu1 - cpu0).as_secs_f64();
        assert!(
            cpu > 0.0,
            "the broker used no CPU while {count} publishers ran"
        );
        assert!(delivered > 0, "nothing delivered with {count} publishers");
        let rate = delivered as f64 / cpu;
        println!(
            "{count} publishers: {delivered} delivered ({dropped} dropped) in {cpu:.2} s of \
             broker CPU: {rate:.0} msg per CPU-second"
        );
        per_cpu.push((count, rate));
    }
    println!(
        "{}",
        broker
            .log_text()
            .lines()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let single = per_cpu[0].1;
    for &(count, rate) in &per_cpu[1..] {
        assert!(
            rate >= 0.8 * single,
            "{count} publishers: {rate:.0} delivered per broker CPU-second, below 80% of \
             {single:.0} with one publisher: the broker reads what it then drops"
        );
    }
    let dropped = broker.metrics().get("mqttd_messages_dropped_total");
    println!(
        "{}",
        broker
            .log_text()
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("dropped: {dropped}");
    broker.stop();
}
