//! `mqttd p2p ping NODE_ID`: dials a node (any mqttd with a `p2p://` listener answers) for the
//! ping protocol and prints one line per ping, with the path its answer came on (`direct` or
//! `relay`) and the round-trip time, then a summary:
//!
//! ```text
//! seq=1 path=relay rtt_ms=2.310
//! seq=2 path=direct rtt_ms=0.412
//! seq=3 timeout
//! summary sent=3 received=2 direct=yes first_ms=48 direct_ms=61
//! ```
//!
//! `first_ms` is the time from the start (before dialing) to the first answer, `direct_ms`
//! to the first direct path iroh opened (`-` for none). Exit status 0 when any ping was
//! answered, 1 otherwise. SIGINT or SIGTERM stops the pings early, as Ctrl-C stops ping(8):
//! the summary still comes, with what was seen so far.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use mqttd_p2p::{
    Node, NodeAddr, NodeConfig, NodeId, NodeKey, PathEvent, PathKind, Pinger, RelayUrl, Retry,
    PING_ALPN,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Options of `mqttd p2p ping`.
#[derive(Debug, Args)]
pub(crate) struct PingArgs {
    /// The node to ping (64 hex digits, as `mqttd id` prints it).
    node_id: String,
    /// A relay (https://HOST:PORT) the node is reached through, unless a direct address works;
    /// repeatable.
    #[arg(long = "relay", value_name = "URL")]
    relays: Vec<String>,
    /// PEM CA certificates the relays' certificates are checked against (a broker's generated
    /// <data_dir>/tls/ca.pem), besides the compiled-in Mozilla roots.
    #[arg(long, value_name = "FILE")]
    relay_cafile: Option<PathBuf>,
    /// A UDP address the node may be reached at directly; repeatable.
    #[arg(long = "peer-addr", value_name = "IP:PORT")]
    peer_addrs: Vec<SocketAddr>,
    /// This node's key file, created if missing [default: a new key].
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Pings to send.
    #[arg(short, long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Seconds between pings.
    #[arg(short, long, default_value_t = 1.0, value_name = "SECS")]
    interval: f64,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    wait: f64,
    /// Seconds allowed to connect (a failed attempt is tried again after 200 ms, then twice as
    /// long each time up to 3 s, with jitter, while they last).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    connect_timeout: u64,
}

/// What the run saw, for the summary.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    received: u64,
    first: Option<Duration>,
}

/// Runs the pings; the summary line is printed whatever happens. Returns whether any ping was
/// answered.
pub(crate) async fn run(args: PingArgs) -> anyhow::Result<bool> {
    let start = Instant::now();
    let mut tally = Tally::default();
    let direct_at = Arc::new(Mutex::new(None));
    let outcome = tokio::select! {
        outcome = pings(&args, start, &mut tally, &direct_at) => outcome,
        () = interrupted() => Ok(()),
    };
    let direct = *direct_at.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "summary sent={} received={} direct={} first_ms={} direct_ms={}",
        tally.sent,
        tally.received,
        if direct.is_some() { "yes" } else { "no" },
        millis(tally.first),
        millis(direct),
    );
    outcome?;
    Ok(tally.received > 0)
}

/// Resolves on SIGINT or SIGTERM (on Ctrl-C elsewhere); never if the handlers cannot be set.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn millis(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| d.as_millis().to_string())
}

async fn pings(
    args: &PingArgs,
    start: Instant,
    tally: &mut Tally,
    direct_at: &Arc<Mutex<Option<Duration>>>,
) -> anyhow::Result<()> {
    let id: NodeId = args.node_id.parse()?;
    let node = bind(args).await?;
    // The node dials through each of its relays too: the peer is at home on one of them.
    let to = NodeAddr::new(id).with_direct(args.peer_addrs.iter().copied());
    let limit = Duration::from_secs(args.connect_timeout.max(1));
    // A failed handshake is tried again with backoff and jitter within the limit.
    let retry = Retry::new(limit);
    let conn = tokio::time::timeout(limit, node.connect_with_retry(to, PING_ALPN, &retry))
        .await
        .map_err(|_| anyhow::anyhow!("no connection to {id} within {limit:?}"))?
        .with_context(|| format!("cannot connect to {id}"))?;
    // The first direct path, whenever it opens.
    let mut events = conn.path_events();
    let seen = direct_at.clone();
    let watcher = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let PathEvent::Opened(info) | PathEvent::Selected(info) = event {
                if info.kind.is_direct() {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(start.elapsed());
                    return;
                }
            }
        }
    });
    let mut pinger = Pinger::open(conn)
        .await
        .context("cannot open the ping stream")?;
    let wait = Duration::from_secs_f64(args.wait.max(0.001));
    let interval = Duration::from_secs_f64(args.interval.max(0.0));
    let mut next = tokio::time::Instant::now();
    for n in 0..args.count {
        if n > 0 {
            next += interval;
            tokio::time::sleep_until(next).await;
        }
        tally.sent += 1;
        match pinger.ping(wait).await? {
            Some(pong) => {
                tally.received += 1;
                tally.first.get_or_insert(start.elapsed());
                let path = match &pong.path {
                    Some(PathKind::Direct(_)) => "direct",
                    Some(_) => "relay",
                    None => "none",
                };
                if pong.path.as_ref().is_some_and(PathKind::is_direct) {
                    direct_at
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(start.elapsed());
                }
                println!(
                    "seq={} path={path} rtt_ms={:.3}",
                    pong.seq,
                    pong.rtt.as_secs_f64() * 1000.0
                );
            }
            None => println!("seq={} timeout", n + 1),
        }
    }
    watcher.abort();
    pinger.close();
    node.close().await;
    Ok(())
}

/// This side's node: its key, the relays and their CA file.
async fn bind(args: &PingArgs) -> anyhow::Result<Node> {
    let key = match &args.key_file {
        Some(path) => NodeKey::load_or_create(path)?,
        None => NodeKey::generate(),
    };
    let mut config = NodeConfig::new(key);
    config.relays = args
        .relays
        .iter()
        .map(|url| url.parse::<RelayUrl>())
        .collect::<Result<_, _>>()?;
    if let Some(file) = &args.relay_cafile {
        config.relay_roots = CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("relay CA file {}", file.display()))?;
    }
    if config.relays.is_empty() && args.peer_addrs.is_empty() {
        anyhow::bail!("give a relay (--relay) or a direct address (--peer-addr)");
    }
    Ok(Node::bind(config).await?)
}
