//! `mqttd p2p swarm`: many NAT traversal attempts at once, for the NAT lab's scale test.
//!
//! `serve` binds `--nodes` nodes, each with its own key and UDP socket, that answer pings
//! ([`PING_ALPN`]), and writes their ids to a file once every one is connected to the relay.
//! `dial` binds `--per-target` nodes and has each dial every id in that file at the same
//! time: every attempt is a connection between a different pair of nodes, so each finds its
//! own way through the NATs (its own relay coordination and hole punch), and a process with
//! K nodes and T targets makes K x T attempts. Each attempt pings until the first answer,
//! then waits for a direct path, until its deadline; `--ramp` spreads the starts over some
//! seconds (they still overlap). The run ends with one line:
//!
//! ```text
//! swarm attempts=1000 connected=1000 direct=998 relay=2 failed=0 first_p50_ms=412 first_p99_ms=1630 direct_p50_ms=520 direct_p99_ms=1800 peak_in_flight=735 took_ms=9100
//! ```
//!
//! `first` is the time from an attempt's start (its dial) to the first ping answered,
//! `direct` to its first direct path; `relay` counts the attempts connected only through the
//! relay at the deadline, `failed` those not connected. The percentiles are over the attempts
//! that got there (`-` for none); `peak_in_flight` is the most attempts under way at once
//! (started, neither direct nor failed yet), `took_ms` the whole run from the first start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use mqttd_p2p::{
    serve_pings, Node, NodeAddr, NodeConfig, NodeId, NodeKey, PathEvent, Pinger, RelayUrl,
    PING_ALPN,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// `mqttd p2p swarm serve|dial`.
#[derive(Debug, Subcommand)]
pub(crate) enum SwarmCommand {
    /// Bind nodes that answer pings and write their ids to a file.
    Serve(ServeArgs),
    /// Dial every node in an ids file from several nodes at once and summarize.
    Dial(DialArgs),
}

/// What both sides need to reach the relay.
#[derive(Debug, Args)]
pub(crate) struct NetArgs {
    /// The relay (https://HOST:PORT) that coordinates the attempts; repeatable.
    #[arg(long = "relay", value_name = "URL", required = true)]
    relays: Vec<String>,
    /// PEM CA certificates the relays' certificates are checked against.
    #[arg(long, value_name = "FILE")]
    relay_cafile: Option<PathBuf>,
    /// The UDP address each node binds (port 0: one port per node).
    #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// Seconds allowed for all nodes to connect to the relay.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    online_timeout: u64,
}

/// Options of `mqttd p2p swarm serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Nodes to bind.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    nodes: u64,
    /// Where to write the nodes' ids, one per line, once all are connected to the relay
    /// (written whole: the file appears complete or not at all).
    #[arg(long, value_name = "FILE")]
    ids_out: PathBuf,
    /// Seconds to serve; 0 until interrupted.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    duration: u64,
    #[command(flatten)]
    net: NetArgs,
}

/// Options of `mqttd p2p swarm dial`.
#[derive(Debug, Args)]
pub(crate) struct DialArgs {
    /// The targets' ids, one per line (as `serve --ids-out` writes them).
    #[arg(long, value_name = "FILE")]
    ids: PathBuf,
    /// Dialing nodes, each of which dials every target once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    per_target: u64,
    /// Seconds from the start of each attempt until it is judged.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    deadline: f64,
    /// Seconds over which the attempts' starts are spread evenly (0: all at once). They still
    /// overlap: the summary's `peak_in_flight` says how many were under way at once.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    ramp: f64,
    #[command(flatten)]
    net: NetArgs,
}

/// Runs a swarm command.
pub(crate) async fn run(command: SwarmCommand) -> anyhow::Result<()> {
    match command {
        SwarmCommand::Serve(args) => serve(args).await,
        SwarmCommand::Dial(args) => dial(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let nodes = bind_all(&args.net, args.nodes, true).await?;
    let ids: String = nodes.iter().map(|n| format!("{}\n", n.id())).collect();
    write_whole(&args.ids_out, ids.as_bytes())?;
    println!("swarm serving nodes={}", nodes.len());
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for node in &nodes {
        let node = node.clone();
        let served = served.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Some(incoming) = node.accept().await {
                let served = served.clone();
                conns.spawn(async move {
                    if let Ok(conn) = incoming.accept().await {
                        served.fetch_add(1, Ordering::Relaxed);
                        serve_pings(&conn).await;
                    }
                });
                // Finished connections' tasks are reaped as new ones come.
                while conns.try_join_next().is_some() {}
            }
        });
    }
    let stop = async {
        match args.duration {
            0 => std::future::pending::<()>().await,
            secs => tokio::time::sleep(Duration::from_secs(secs)).await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = stop => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!(
        "swarm served connections={}",
        served.load(Ordering::Relaxed)
    );
    close_all(nodes).await;
    tasks.abort_all();
    Ok(())
}

/// What became of one attempt.
#[derive(Debug, Default)]
struct Outcome {
    /// From the dial to the first ping answered.
    first: Option<Duration>,
    /// From the dial to the first direct path.
    direct: Option<Duration>,
    /// Why it failed, if it did.
    error: Option<String>,
}

async fn dial(args: DialArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.ids)
        .with_context(|| format!("ids file {}", args.ids.display()))?;
    let targets = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::parse::<NodeId>)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("ids file {}", args.ids.display()))?;
    anyhow::ensure!(!targets.is_empty(), "no ids in {}", args.ids.display());
    let nodes = bind_all(&args.net, args.per_target, false).await?;
    let total = nodes.len() * targets.len();
    let step = Duration::from_secs_f64(args.ramp.max(0.0)) / u32::try_from(total).unwrap_or(1);
    let limit = Duration::from_secs_f64(args.deadline.max(0.1));
    let flight = Arc::new(InFlight::default());
    let start = Instant::now();
    let mut attempts = JoinSet::new();
    let mut n = 0;
    for target in &targets {
        for node in &nodes {
            let mut to = NodeAddr::new(*target);
            if let Some(relay) = node.relays().first() {
                to = to.with_relay(relay.clone());
            }
            let (node, flight) = (node.clone(), flight.clone());
            let at = start + step * n;
            n += 1;
            attempts.spawn(async move {
                tokio::time::sleep_until(at).await;
                flight.started();
                let outcome = attempt(node, to, Instant::now() + limit).await;
                flight.ended();
                outcome
            });
        }
    }
    let mut outcomes = Vec::with_capacity(attempts.len());
    while let Some(done) = attempts.join_next().await {
        outcomes.push(done.unwrap_or_else(|e| Outcome {
            error: Some(format!("attempt task: {e}")),
            ..Outcome::default()
        }));
    }
    println!(
        "{} peak_in_flight={} took_ms={}",
        summary(&outcomes),
        flight.peak.load(Ordering::Relaxed),
        start.elapsed().as_millis()
    );
    let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
    for e in outcomes.iter().filter_map(|o| o.error.as_deref()) {
        *errors.entry(e).or_default() += 1;
    }
    for (error, n) in errors {
        eprintln!("swarm failed attempts={n} error={error}");
    }
    close_all(nodes).await;
    Ok(())
}

/// Attempts under way, and the most at once.
#[derive(Debug, Default)]
struct InFlight {
    now: AtomicU64,
    peak: AtomicU64,
}

impl InFlight {
    fn started(&self) {
        let now = self.now.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
    }

    fn ended(&self) {
        self.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One traversal attempt: dial, ping until answered, then wait for a direct path, all by
/// `deadline`. The connection stays open until the deadline or its direct path, so that the
/// attempts run concurrently to the end.
async fn attempt(node: Node, to: NodeAddr, deadline: Instant) -> Outcome {
    let start = Instant::now();
    let mut outcome = Outcome::default();
    let conn = match tokio::time::timeout_at(deadline, node.connect(to, PING_ALPN)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            outcome.error = Some(format!("connect: {e}"));
            return outcome;
        }
        Err(_) => {
            outcome.error = Some("connect: deadline".to_owned());
            return outcome;
        }
    };
    // Subscribed before the paths are read, so that no direct path opens unseen in between.
    let mut events = conn.path_events();
    if conn.paths().iter().any(|p| p.kind.is_direct()) {
        outcome.direct = Some(start.elapsed());
    }
    let pinger = tokio::time::timeout_at(deadline, Pinger::open(conn.clone())).await;
    let mut pinger = match pinger {
        Ok(Ok(pinger)) => pinger,
        Ok(Err(e)) => {
            outcome.error = Some(format!("ping stream: {e}"));
            return outcome;
        }
        Err(_) => {
            outcome.error = Some("ping stream: deadline".to_owned());
            return outcome;
        }
    };
    while outcome.first.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            outcome.error = Some("ping: deadline".to_owned());
            return outcome;
        }
        match pinger.ping(left.min(Duration::from_secs(1))).await {
            Ok(Some(pong)) => {
                outcome.first = Some(start.elapsed());
                if pong.path.as_ref().is_some_and(|p| p.is_direct()) {
                    outcome.direct.get_or_insert(start.elapsed());
                }
            }
            Ok(None) => {}
            Err(e) => {
                outcome.error = Some(format!("ping: {e}"));
                return outcome;
            }
        }
    }
    while outcome.direct.is_none() {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(PathEvent::Opened(info) | PathEvent::Selected(info)))
                if info.kind.is_direct() =>
            {
                outcome.direct = Some(start.elapsed());
            }
            Ok(Some(PathEvent::Lagged { .. })) => {
                if conn.paths().iter().any(|p| p.kind.is_direct()) {
                    outcome.direct = Some(start.elapsed());
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    pinger.close();
    outcome
}

/// The summary line of a dial run.
fn summary(outcomes: &[Outcome]) -> String {
    let mut first: Vec<Duration> = outcomes.iter().filter_map(|o| o.first).collect();
    let mut direct: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.first.is_some())
        .filter_map(|o| o.direct)
        .collect();
    first.sort_unstable();
    direct.sort_unstable();
    let connected = first.len();
    format!(
        "swarm attempts={} connected={connected} direct={} relay={} failed={} \
         first_p50_ms={} first_p99_ms={} direct_p50_ms={} direct_p99_ms={}",
        outcomes.len(),
        direct.len(),
        connected - direct.len(),
        outcomes.len() - connected,
        percentile(&first, 50),
        percentile(&first, 99),
        percentile(&direct, 50),
        percentile(&direct, 99),
    )
}

/// The nearest-rank percentile of sorted `values`, in milliseconds; `-` for none.
fn percentile(sorted: &[Duration], p: usize) -> String {
    if sorted.is_empty() {
        return "-".to_owned();
    }
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted
        .get(rank - 1)
        .map_or_else(|| "-".to_owned(), |d| d.as_millis().to_string())
}

/// Binds `count` nodes (answering pings if `serving`) and waits until every one is connected
/// to a relay.
async fn bind_all(net: &NetArgs, count: u64, serving: bool) -> anyhow::Result<Vec<Node>> {
    let relays = net
        .relays
        .iter()
        .map(|url| url.parse::<RelayUrl>())
        .collect::<Result<Vec<_>, _>>()?;
    let roots = match &net.relay_cafile {
        Some(file) => CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("relay CA file {}", file.display()))?,
        None => Vec::new(),
    };
    let mut binding = JoinSet::new();
    for _ in 0..count {
        let mut config = NodeConfig::new(NodeKey::generate());
        config.bind = vec![net.bind];
        config.relays = relays.clone();
        config.relay_roots = roots.clone();
        if serving {
            config.alpns = vec![PING_ALPN.to_vec()];
        }
        binding.spawn(Node::bind(config));
    }
    let mut nodes = Vec::with_capacity(binding.len());
    while let Some(bound) = binding.join_next().await {
        nodes.push(bound.context("bind task")??);
    }
    let limit = Duration::from_secs(net.online_timeout.max(1));
    let mut online = JoinSet::new();
    for node in &nodes {
        let node = node.clone();
        online.spawn(async move {
            let connected = node.wait_relays(|s| s.iter().any(|s| s.connected));
            tokio::time::timeout(limit, connected).await.is_ok()
        });
    }
    let mut offline = 0;
    while let Some(ok) = online.join_next().await {
        if !ok.unwrap_or(false) {
            offline += 1;
        }
    }
    if offline > 0 {
        let states = nodes.first().map(Node::relay_states);
        close_all(nodes).await;
        anyhow::bail!("{offline} nodes not connected to a relay within {limit:?}: {states:?}");
    }
    Ok(nodes)
}

async fn close_all(nodes: Vec<Node>) {
    let mut closing = JoinSet::new();
    for node in nodes {
        closing.spawn(async move { node.close().await });
    }
    // A node that cannot say goodbye in time is dropped anyway.
    let _ = tokio::time::timeout(Duration::from_secs(5), closing.join_all()).await;
}

/// Writes `data` to `path` through a temporary file and a rename, so that readers see all of
/// it or nothing.
fn write_whole(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&v, 50), "50");
        assert_eq!(percentile(&v, 99), "99");
        assert_eq!(percentile(&ms(&[7]), 99), "7");
        assert_eq!(percentile(&[], 50), "-");
    }

    #[test]
    fn the_summary_counts_direct_relay_and_failed() {
        let at = |first: Option<u64>, direct: Option<u64>| Outcome {
            first: first.map(Duration::from_millis),
            direct: direct.map(Duration::from_millis),
            error: None,
        };
        let line = summary(&[
            at(Some(10), Some(20)),
            at(Some(30), None),
            at(None, None),
            at(Some(40), Some(50)),
        ]);
        assert_eq!(
            line,
            "swarm attempts=4 connected=3 direct=2 relay=1 failed=1 first_p50_ms=30 \
             first_p99_ms=40 direct_p50_ms=20 direct_p99_ms=50"
        );
    }
}
