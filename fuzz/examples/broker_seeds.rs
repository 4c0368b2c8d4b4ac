//! Writes the seed corpus of the `broker` fuzz target: a few meaningful scripts, each checked
//! to get where it means to (and, like every input, to break none of the target's checks).
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example broker_seeds -- fuzz/corpus/broker
//! ```
//!
//! File names say what a seed plays, so rerunning the program overwrites its own seeds and
//! leaves any other file in the directory alone.

use std::path::PathBuf;

use mqttd_fuzz::broker::{op, run, step, Stats};

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus/broker".to_owned()),
    );
    std::fs::create_dir_all(&dir)?;
    let seeds = seeds();
    for (name, script, expect) in &seeds {
        let stats = run(script);
        assert!(
            expect(&stats),
            "{name} did not get where it means to: {stats:?}"
        );
        std::fs::write(dir.join(name), script)?;
        println!("{name}: {} bytes, {stats:?}", script.len());
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}

type Expect = fn(&Stats) -> bool;

/// CONNECT flags (first argument): the version, then bits.
const V5: u8 = 0;
const V311: u8 = 1;
const V31: u8 = 2;
const RESUME: u8 = 0x04;
const EXPIRY: u8 = 0x08;
/// CONNECT second argument: a will.
const WILL: u8 = 0x10;
/// Client identifiers (second argument of CONNECT, low bits).
const C0: u8 = 0;
const C1: u8 = 1;
/// Filter bits for SUBSCRIBE: `#`, `a/+`, `a`, `$share/g/a/#`.
const ALL: u8 = 0;
const A_PLUS: u8 = 1 << 1;
const SHARED: u8 = 1 << 3;
/// Topics for PUBLISH (low bits) and QoS (bits 2-3).
const T_A: u8 = 0;
const T_AB: u8 = 1;
const T_SENSOR: u8 = 2;
const QOS1: u8 = 1 << 2;
const QOS2: u8 = 2 << 2;

struct S(Vec<u8>);

impl S {
    fn new() -> Self {
        Self(Vec::new())
    }
    fn op(mut self, slot: u8, code: u8, args: &[u8]) -> Self {
        self.0.push(step(slot, code));
        self.0.extend_from_slice(args);
        self
    }
    fn connect(self, slot: u8, flags: u8, id: u8) -> Self {
        self.op(slot, op::CONNECT, &[flags, id, 0])
    }
    fn subscribe(self, slot: u8, filters: u8, qos: u8) -> Self {
        self.op(slot, op::SUBSCRIBE, &[filters, qos])
    }
    fn publish(self, slot: u8, what: u8) -> Self {
        self.op(slot, op::PUBLISH, &[what])
    }
    fn ack_all(self, slot: u8) -> Self {
        self.op(slot, op::ACK_ALL, &[])
    }
}

fn seeds() -> Vec<(&'static str, Vec<u8>, Expect)> {
    vec![
        (
            "pubsub",
            // A 3.1.1 subscriber to `a/+` and `a` at QoS 1, an MQTT 5 publisher: two
            // messages for it, one for nobody, an unsubscribe, a ping.
            S::new()
                .connect(0, V311, C0)
                .connect(1, V5, C1)
                .subscribe(0, A_PLUS, 1)
                .publish(1, T_AB | QOS1)
                .ack_all(0)
                .publish(1, T_A)
                .publish(1, T_SENSOR | QOS1)
                .op(0, op::UNSUBSCRIBE, &[1])
                .op(1, op::PING, &[])
                .0,
            |s| s.connected == 2 && s.delivered == 2,
        ),
        (
            "qos2",
            // QoS 2 both ways: the publisher resends with DUP before PUBREL (not routed
            // again), then both sides complete their flows.
            S::new()
                .connect(0, V5, C0)
                .connect(1, V311, C1)
                .subscribe(0, ALL, 2)
                .publish(1, T_AB | QOS2)
                .op(1, op::RESEND, &[])
                .ack_all(1)
                .ack_all(0)
                .ack_all(0)
                .0,
            |s| s.delivered == 1 && s.qos2_completed == 1,
        ),
        (
            "takeover",
            // A persistent 3.1.1 session subscribed to `a` is taken over by a second
            // connection with the same client identifier, which resumes it and receives.
            S::new()
                .connect(0, V311 | RESUME, C0 | WILL)
                .subscribe(0, A_PLUS, 1)
                .connect(1, V5, C1)
                .connect(2, V311 | RESUME, C0)
                .publish(1, T_A | QOS1)
                .ack_all(2)
                .connect(0, V5 | RESUME | EXPIRY, C0)
                .publish(1, T_AB | QOS2)
                .ack_all(0)
                .ack_all(1)
                .ack_all(0)
                .0,
            |s| s.resumed == 2 && s.delivered >= 2,
        ),
        (
            "malformed",
            // A subscriber to `#`; another client sends a PUBLISH whose topic runs past
            // its end, a third one a PUBLISH before CONNECT: only they are closed, the
            // subscriber still receives from a new connection of the third.
            S::new()
                .connect(0, V311, C0)
                .subscribe(0, ALL, 0)
                .connect(1, V5, C1)
                .op(1, op::RAW, &[4, 0x32, 0x02, 0x00, 0x05])
                .publish(2, T_A)
                .connect(2, V31, 2)
                .publish(2, T_AB)
                .0,
            |s| s.malformed == 2 && s.disconnected == 1 && s.delivered == 1,
        ),
        (
            "will-shared",
            // A shared subscriber and a plain one; a client with a will closes its stream,
            // another ends normally (its will is cancelled); time passes.
            S::new()
                .connect(0, V5, C0)
                .subscribe(0, SHARED, 1)
                .connect(1, V311, C1 | WILL | (1 << 5))
                .connect(2, V5, 2 | WILL)
                .op(2, op::DISCONNECT, &[0])
                .op(1, op::CLOSE, &[])
                .op(0, op::TIME, &[2])
                .ack_all(0)
                .0,
            |s| s.wills >= 1,
        ),
    ]
}
