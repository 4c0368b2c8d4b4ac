//! `mqttd`: the broker and its tools.

use std::net::SocketAddr;
use std::path::PathBuf;

mod bench;
mod ctl;
mod format;
mod ping;
mod swarm;
mod tools;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mqttd_broker::api::KeyStore;
use mqttd_broker::{Broker, Config, ListenerKind};
use mqttd_p2p::NodeKey;
use tracing::{info, warn};

/// MQTT broker with MQTT over QUIC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve(ServeArgs),
    /// Add or update a user in a password file (like mosquitto_passwd).
    Passwd(PasswdArgs),
    /// Publish a message (like mosquitto_pub; -h is the host, --help the help).
    #[command(disable_help_flag = true, after_help = tools::EXIT_STATUS_HELP)]
    Pub(tools::PubArgs),
    /// Subscribe and print messages (like mosquitto_sub; -h is the host, --help the help).
    #[command(disable_help_flag = true, after_help = tools::EXIT_STATUS_HELP)]
    Sub(tools::SubArgs),
    /// Generate load and measure throughput and latency (like emqtt-bench).
    Bench(bench::BenchArgs),
    /// Print this broker's peer-to-peer node id (creating its key, <data_dir>/node.key, on
    /// first use).
    Id(IdArgs),
    /// Peer-to-peer diagnostics.
    #[command(subcommand)]
    P2p(P2pCommand),
    /// Administer a running broker through its admin API (clients, sessions, retained
    /// messages, listeners, stats, publish, reload).
    #[command(after_help = ctl::AFTER_HELP)]
    Ctl(ctl::CtlArgs),
    /// The cluster through this node's admin API: status, join, leave (`[cluster]`).
    #[command(after_help = ctl::AFTER_HELP)]
    Cluster(ctl::ClusterArgs),
    /// Validate a configuration and the files it names, without starting: prints "ok" or
    /// each error; exit status 0 or 1.
    CheckConfig(CheckConfigArgs),
    /// Manage the admin API's keys (stored hashed in <data_dir>/api-keys).
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
}

#[derive(Debug, Subcommand)]
enum ApiKeyCommand {
    /// Create a key named NAME and print it: it is shown this once, only its hash is stored.
    Create {
        /// A name for the key (letters, digits, '-', '_', '.').
        name: String,
        #[command(flatten)]
        dir: IdArgs,
    },
    /// List the keys' names and creation times.
    List {
        #[command(flatten)]
        dir: IdArgs,
    },
    /// Revoke the key named NAME (at once, also for a running broker).
    Revoke {
        /// The key's name.
        name: String,
        #[command(flatten)]
        dir: IdArgs,
    },
}

#[derive(Debug, Subcommand)]
enum P2pCommand {
    /// Ping a node (any mqttd with a p2p:// listener answers): one line per ping with the
    /// path (direct or relay) and the round-trip time, then
    /// `summary sent=N received=M direct=yes|no first_ms=T direct_ms=T` (first_ms: from the
    /// start to the first answer; direct_ms: to the first direct path, or -). Exit status 0
    /// if any ping was answered. SIGINT or SIGTERM ends it early, with the summary.
    Ping(ping::PingArgs),
    /// Many traversal attempts at once, for the NAT lab's scale test (see swarm.rs).
    #[command(subcommand, hide = true)]
    Swarm(swarm::SwarmCommand),
}

#[derive(Debug, Args)]
struct IdArgs {
    /// Directory for persistent data (default: the configuration's `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file, for its `data_dir`.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Args, Default)]
struct ServeArgs {
    /// Listener URL (tcp://HOST:PORT, tls://HOST:PORT, ws://HOST:PORT[/PATH],
    /// wss://HOST:PORT[/PATH], quic://HOST:PORT, http://HOST:PORT, relay://HOST:PORT,
    /// p2p:// or p2p://HOST:PORT, with options such as ?proxy_protocol=true or
    /// ?trust_proxy=true); repeatable. Given any, they replace the default listeners
    /// (tcp://127.0.0.1:1883, tls://127.0.0.1:8883, ws://127.0.0.1:8083/mqtt,
    /// wss://127.0.0.1:8084/mqtt, quic://127.0.0.1:14567, http://127.0.0.1:18083 for the
    /// admin API, /health and /metrics).
    #[arg(long = "listen", value_name = "URL")]
    listen: Vec<String>,
    /// Directory for persistent data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Allow clients without a user name, on every listener.
    #[arg(long)]
    allow_anonymous: bool,
    /// Password file (see `mqttd passwd`).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// ACL file in Mosquitto's syntax.
    #[arg(long, value_name = "FILE")]
    acl_file: Option<PathBuf>,
    /// Largest keep alive clients may use, in seconds.
    #[arg(long, value_name = "SECS")]
    max_keepalive: Option<u16>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
struct CheckConfigArgs {
    /// The configuration file (default: as `mqttd` would run, with the options below).
    file: Option<PathBuf>,
    /// The options of `mqttd serve`, which lay over the file as they would there.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Args)]
struct PasswdArgs {
    /// The password file; created if missing.
    file: PathBuf,
    /// The user to add or update.
    user: String,
    /// The password (read from standard input if omitted).
    #[arg(long, short = 'p')]
    password: Option<String>,
    /// Remove the user instead.
    #[arg(long, short = 'D')]
    delete: bool,
}

/// The listeners of a bare `mqttd`: loopback only. The TLS-based ones use the local CA and
/// server certificate generated under `<data_dir>/tls/` on first start.
const DEFAULT_LISTENERS: &[&str] = &[
    "tcp://127.0.0.1:1883",
    "tls://127.0.0.1:8883",
    "ws://127.0.0.1:8083",
    "wss://127.0.0.1:8084",
    "quic://127.0.0.1:14567",
    // The admin API (and /health, /metrics) on EMQX's dashboard port.
    "http://127.0.0.1:18083",
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Passwd(args)) => passwd(args),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Pub(args)) => client_tool(tools::publish(args)),
        Some(Command::Sub(args)) => client_tool(tools::subscribe(args)),
        Some(Command::Id(args)) => id(args),
        Some(Command::ApiKey(command)) => api_key(command),
        Some(Command::Ctl(args)) => ctl(args),
        Some(Command::Cluster(args)) => ctl(args.into()),
        Some(Command::CheckConfig(args)) => check_config(args),
        Some(Command::P2p(P2pCommand::Ping(args))) => p2p_ping(args),
        Some(Command::P2p(P2pCommand::Swarm(command))) => {
            init_logging_at(LogFormat::Text, "warn");
            raise_fd_limit();
            tokio::runtime::Runtime::new()?.block_on(swarm::run(command))
        }
        Some(Command::Bench(args)) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(bench::run(args))
        }
        None => serve(cli.serve),
    }
}

/// Runs `mqttd pub` or `mqttd sub` and exits with its status (see `tools::Status`).
fn client_tool(
    task: impl std::future::Future<Output = Result<(), tools::Failure>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(task);
    // The connection tasks go now, not after the exit below.
    drop(runtime);
    if let Err(failure) = outcome {
        eprintln!("Error: {:#}", failure.error);
        std::process::exit(failure.status as i32);
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    init_logging_at(format, "info");
}

/// Logging to standard error at `RUST_LOG`'s level, else at `default`.
fn init_logging_at(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if config.listen.is_empty() {
        config.listen = DEFAULT_LISTENERS.iter().map(|s| (*s).to_owned()).collect();
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if args.allow_anonymous {
        config.allow_anonymous = Some(true);
    }
    if let Some(f) = &args.password_file {
        config.password_file = Some(f.clone());
    }
    if let Some(f) = &args.acl_file {
        config.acl_file = Some(f.clone());
    }
    if let Some(k) = args.max_keepalive {
        config.max_keepalive = k;
    }
    Ok(config)
}

/// On the first start with an `http://` listener (no key file yet), creates the admin API's
/// first key, `admin`, and prints it: on standard output, once, never to the log.
fn first_api_key(config: &Config) -> anyhow::Result<()> {
    let serves_api = config
        .listeners()?
        .iter()
        .any(|l| l.kind == ListenerKind::Http);
    let store = KeyStore::new(&config.data_dir);
    if !serves_api || store.exists() {
        return Ok(());
    }
    let key = store.create("admin")?;
    println!("mqttd api key admin {key}");
    println!(
        "mqttd api key shown once; its hash is stored in {} (more: mqttd api-key create NAME)",
        store.path().display()
    );
    Ok(())
}

/// `mqttd api-key ...`.
fn api_key(command: ApiKeyCommand) -> anyhow::Result<()> {
    let dir = match &command {
        ApiKeyCommand::Create { dir, .. }
        | ApiKeyCommand::List { dir }
        | ApiKeyCommand::Revoke { dir, .. } => dir,
    };
    let mut config = match &dir.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = &dir.data_dir {
        config.data_dir = d.clone();
    }
    let store = KeyStore::new(&config.data_dir);
    match command {
        ApiKeyCommand::Create { name, .. } => {
            let key = store.create(&name)?;
            // The key alone on standard output, for scripts; the rest on standard error.
            println!("{key}");
            eprintln!(
                "API key {name:?} created; it is not shown again. Its hash is stored in {}. \
                 Use it as: Authorization: Bearer KEY",
                store.path().display()
            );
        }
        ApiKeyCommand::List { .. } => {
            for key in store.list()? {
                let created = chrono::DateTime::from_timestamp(key.created as i64, 0)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default();
                println!("{} {created}", key.name);
            }
        }
        ApiKeyCommand::Revoke { name, .. } => {
            if !store.revoke(&name)? {
                anyhow::bail!("no API key named {name:?}");
            }
            eprintln!("API key {name:?} revoked");
        }
    }
    Ok(())
}

/// `mqttd ctl`: exits with its status (see `ctl::AFTER_HELP`).
fn ctl(args: ctl::CtlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(ctl::run(args));
    drop(runtime);
    if let Err(failure) = outcome {
        eprintln!("Error: {}", failure.message);
        std::process::exit(failure.status);
    }
    Ok(())
}

/// `mqttd check-config`: "ok", or each problem on its own line and exit status 1.
fn check_config(args: CheckConfigArgs) -> anyhow::Result<()> {
    let mut serve = args.serve;
    if let Some(file) = args.file {
        serve.config = Some(file);
    }
    let name = serve.config.as_ref().map_or_else(
        || "the default configuration".to_owned(),
        |p| p.display().to_string(),
    );
    let problems: Vec<String> = match load_config(&serve) {
        Ok(config) => {
            let mut problems: Vec<String> = mqttd_broker::check::check(&config)
                .iter()
                .map(|problem| format!("{name}: {problem}"))
                .collect();
            if let Some(level) = &config.log_level {
                if let Err(error) = tracing_subscriber::EnvFilter::try_new(level) {
                    problems.push(format!("{name}: log_level {level:?}: {error}"));
                }
            }
            problems
        }
        // It names the file, and its source is in its message already.
        Err(error) => vec![error.to_string()],
    };
    if problems.is_empty() {
        println!("ok");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("{problem}");
    }
    std::process::exit(1);
}

/// Raises the open-file soft limit to the hard limit: every connection is a descriptor.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(limit, "open-file limit"),
        Err(error) => warn!(%error, "could not raise the open-file limit"),
    }
}

/// The serving broker's log filter, which a reload may change (`log_level`).
type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The filter of the broker's log: `RUST_LOG` if set, else the configuration's `log_level`,
/// else `info`.
fn log_filter(config: &Config) -> Result<tracing_subscriber::EnvFilter, String> {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        return Ok(filter);
    }
    let level = config.log_level.as_deref().unwrap_or("info");
    tracing_subscriber::EnvFilter::try_new(level).map_err(|e| format!("log_level {level:?}: {e}"))
}

/// Logging for `mqttd serve`, with a filter that reloads can replace.
fn init_serve_logging(format: LogFormat, config: &Config) -> anyhow::Result<LogFilter> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(
        log_filter(config).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
    }
    Ok(handle)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let log_filter_handle = init_serve_logging(args.log_format, &config)?;
    let args = &args;
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        if !config.anonymous_allowed() && config.password_file.is_none() {
            warn!("anonymous access is off and no password file is set: no client can connect");
        }
        // Before anything is announced, so that a SIGTERM sent as soon as the "listening" line
        // is read still shuts down gracefully instead of killing the process.
        let signals = Signals::install();
        // The peer-to-peer identity exists from the first start on, so that `mqttd id` and
        // the relays' allow-lists can name this broker before it uses it.
        let key = NodeKey::load_or_create(&config.data_dir.join(mqttd_p2p::KEY_FILE))?;
        info!(node_id = %key.id(), "peer-to-peer node id");
        let hostnames = config.tls.hostnames.clone();
        first_api_key(&config)?;
        let reread = args.clone();
        let broker = Broker::builder(config)
            .config_source(move || {
                let config = load_config(&reread).map_err(|e| format!("{e}"))?;
                // Checked here, so that a bad one fails the whole reload.
                log_filter(&config)?;
                Ok(config)
            })
            .on_reload(move |config| {
                if std::env::var_os("RUST_LOG").is_some() {
                    // RUST_LOG wins over log_level, on reload as at start.
                    return Vec::new();
                }
                match log_filter(config).map(|f| log_filter_handle.reload(f)) {
                    Ok(Ok(())) => vec!["log_level".to_owned()],
                    _ => Vec::new(),
                }
            })
            .start()
            .await?;
        // One line per listener on standard output, with the bound port, for scripts and tests
        // that ask for port 0.
        for (listener, addr) in broker.local_addrs() {
            let scheme = listener.url.split("://").next().unwrap_or("tcp");
            match (listener.kind, broker.node()) {
                // Peers dial the node id; its UDP sockets are for direct paths.
                (ListenerKind::P2p, Some(node)) => {
                    println!("mqttd listening on p2p://{}", node.id());
                    for addr in node.bound_addrs() {
                        println!("mqttd p2p direct {addr}");
                    }
                }
                _ => println!("mqttd listening on {scheme}://{addr}"),
            }
            if listener.kind == ListenerKind::Relay {
                println!("mqttd relay url {}", relay_url(*addr, &hostnames));
            }
        }
        signals.wait(&broker).await;
        info!("shutting down");
        broker.shutdown().await;
        info!("stopped");
        Ok(())
    })
}

/// The signal handlers: SIGTERM and SIGINT stop the broker, SIGHUP reloads (see
/// `Broker::reload`).
#[cfg(unix)]
struct Signals(Option<[tokio::signal::unix::Signal; 3]>);

#[cfg(unix)]
impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Self(Some([term, int, hup])),
            _ => {
                warn!("cannot install signal handlers");
                Self(None)
            }
        }
    }

    /// Runs until a stop signal or until the broker is shut down from elsewhere; SIGHUP
    /// reloads.
    async fn wait(self, broker: &Broker) {
        let Some([term, int, hup]) = self.0 else {
            broker.closed().await;
            return;
        };
        run_until_signal(broker, term, int, hup).await;
    }
}

#[cfg(unix)]
async fn run_until_signal(
    broker: &Broker,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    mut hup: tokio::signal::unix::Signal,
) {
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = broker.closed() => return,
            _ = hup.recv() => {
                // The broker logs the outcome and what needs a restart.
                let _ = broker.reload();
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Self {
        Self
    }

    async fn wait(self, broker: &Broker) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = broker.closed() => {}
        }
    }
}

/// The URL nodes reach a relay listener bound to `addr` at: its address, or for an
/// unspecified one the first of `tls.hostnames` (the name in the generated certificate), else
/// loopback.
fn relay_url(addr: SocketAddr, hostnames: &[String]) -> String {
    if !addr.ip().is_unspecified() {
        return format!("https://{addr}/");
    }
    match hostnames.first() {
        Some(host) if host.parse::<std::net::Ipv6Addr>().is_ok() => {
            format!("https://[{host}]:{}/", addr.port())
        }
        Some(host) => format!("https://{host}:{}/", addr.port()),
        None => {
            warn!(
                %addr,
                "relay on an unspecified address and no tls.hostnames: its URL names loopback; \
                 peers elsewhere need the host's name or address instead"
            );
            let ip: std::net::IpAddr = match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            };
            format!("https://{}/", SocketAddr::new(ip, addr.port()))
        }
    }
}

/// `mqttd p2p ping`: exits 1 when no ping was answered (or the node could not be reached).
fn p2p_ping(args: ping::PingArgs) -> anyhow::Result<()> {
    // Standard output is the report; the log only says what went wrong.
    init_logging_at(LogFormat::Text, "warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let answered = runtime.block_on(ping::run(args))?;
    drop(runtime);
    if !answered {
        std::process::exit(1);
    }
    Ok(())
}

/// `mqttd id`: loads (or creates) the node key and prints its id alone on standard output.
fn id(args: IdArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text);
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let key = NodeKey::load_or_create(&config.data_dir.join(mqttd_p2p::KEY_FILE))?;
    println!("{}", key.id());
    Ok(())
}

fn passwd(args: PasswdArgs) -> anyhow::Result<()> {
    use mqttd_broker::auth::{Iterations, PasswordFile};
    let mut file = if args.file.exists() {
        PasswordFile::load(&args.file)?
    } else {
        PasswordFile::new()
    };
    if args.delete {
        if !file.remove(&args.user) {
            anyhow::bail!("no user {:?} in {}", args.user, args.file.display());
        }
    } else {
        let password = match args.password {
            Some(p) => p,
            None => {
                eprint!("Password for {}: ", args.user);
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            }
        };
        file.set_password(&args.user, password.as_bytes(), Iterations::DEFAULT)?;
    }
    file.save(&args.file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls_name_the_bound_address_or_the_certificates_host() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            relay_url(at("127.0.0.1:4433"), &[]),
            "https://127.0.0.1:4433/"
        );
        assert_eq!(
            relay_url(at("0.0.0.0:4433"), &["relay.example".into()]),
            "https://relay.example:4433/"
        );
        assert_eq!(
            relay_url(at("[::]:4433"), &["::1".into()]),
            "https://[::1]:4433/"
        );
        assert_eq!(relay_url(at("[::]:4433"), &[]), "https://[::1]:4433/");
    }

    #[test]
    fn bare_mqttd_serves_tcp_tls_websocket_wss_quic_and_the_api_on_loopback_only() {
        let config = load_config(&ServeArgs::default()).unwrap();
        let listeners = config.listeners().unwrap();
        let kinds: Vec<_> = listeners.iter().map(|l| (l.kind, l.addr.port())).collect();
        assert_eq!(
            kinds,
            [
                (ListenerKind::Tcp, 1883),
                (ListenerKind::Tls, 8883),
                (ListenerKind::Ws, 8083),
                (ListenerKind::Wss, 8084),
                (ListenerKind::Quic, 14567),
                (ListenerKind::Http, 18083)
            ]
        );
        assert!(listeners.iter().all(|l| l.is_loopback()));
        assert_eq!(listeners[2].path.as_deref(), Some("/mqtt"));
        assert_eq!(listeners[3].path.as_deref(), Some("/mqtt"));
        assert!(config.anonymous_allowed());
    }
}
