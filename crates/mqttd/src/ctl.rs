//! `mqttd ctl`: a thin client of the admin API (`/api/v1/`), with tables for people and
//! `--json` for scripts (the API's answer as it is).
//!
//! Every command is one request. The URL and the key come from flags, else the environment,
//! else (the key) a file; see [`CtlArgs`]. Errors print the API's `code` and `message` on
//! standard error.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the API is when nothing says otherwise: what a bare `mqttd` serves.
const DEFAULT_URL: &str = "http://127.0.0.1:18083";

/// Exit status: the API answered with an error.
const EXIT_API_ERROR: i32 = 1;
/// Exit status: the API could not be asked (no key, unreachable, not the API).
const EXIT_NO_ANSWER: i32 = 2;

/// Text after `mqttd ctl --help`.
pub(crate) const AFTER_HELP: &str = "\
The URL: --url, else $MQTTD_API_URL, else http://127.0.0.1:18083.
The key, first found: --key, --key-file FILE, $MQTTD_API_KEY, $MQTTD_API_KEY_FILE
(a file holds the key alone, as `mqttd api-key create NAME > FILE` writes it).

Exit status: 0 done; 1 the API answered with an error (its code and message are printed on
standard error, and with --json its JSON on standard output; 401 means no or a wrong API
key); 2 the API could not be asked.";

/// Where the admin API is and how to print its answers: `mqttd ctl`'s and `mqttd cluster`'s.
#[derive(Debug, Args)]
struct ApiFlags {
    /// The admin API's URL (the broker's http:// listener).
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// The API key (visible to other local users in the process list: prefer --key-file or
    /// $MQTTD_API_KEY).
    #[arg(long, global = true, value_name = "KEY")]
    key: Option<String>,
    /// A file holding the API key.
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Print the API's JSON answer as it is instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// `mqttd ctl`'s options and command.
#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    #[command(flatten)]
    api: ApiFlags,
    #[command(subcommand)]
    command: CtlCommand,
}

/// `mqttd cluster`'s options and command: `mqttd ctl cluster` by a shorter name.
#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    api: ApiFlags,
    #[command(subcommand)]
    command: ClusterCommand,
}

impl From<ClusterArgs> for CtlArgs {
    fn from(args: ClusterArgs) -> Self {
        Self {
            api: args.api,
            command: CtlCommand::Cluster(args.command),
        }
    }
}

/// The cluster commands (`GET /api/v1/cluster`, `POST .../join`, `POST .../leave`).
#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// This node's view of the cluster: its id, name and state, the leader, the term, the
    /// last log index and the last applied, and the members (voter or learner, address,
    /// incarnation).
    Status,
    /// Make this node a member: ask SEED (NAME@HOST:PORT, a node of the cluster), else the
    /// configured seeds in turn; done once the leader made it a voter.
    Join {
        /// A node of the cluster: its certificate's name and its cluster address.
        #[arg(value_name = "NAME@HOST:PORT")]
        seed: Option<String>,
    },
    /// Remove this node (or NODE_ID) from the cluster's membership, through the leader.
    Leave {
        /// The node to remove (default: this node).
        node_id: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Connected clients and their sessions.
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Sessions, those held offline included.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Subscriptions: every session's, or those a filter, a topic or a client selects.
    /// With a client id alone, that client's subscriptions (as before the flags existed).
    Subscriptions {
        /// Client identifier: that client's subscriptions.
        client_id: Option<String>,
        /// Only subscriptions with exactly this filter.
        #[arg(long)]
        filter: Option<String>,
        /// Only subscriptions whose filter matches this topic name.
        #[arg(long)]
        topic: Option<String>,
        /// Only the subscriptions of this client.
        #[arg(long, conflicts_with = "client_id")]
        client: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Retained messages.
    #[command(subcommand)]
    Retained(RetainedCommand),
    /// The listeners with their bound addresses and clients.
    Listeners,
    /// The broker's figures.
    Stats,
    /// The bridges: state, remote broker, messages each way, last error.
    Bridges,
    /// The peer-to-peer links: node id, direct or relayed, address, round-trip time.
    Peers,
    /// The running configuration, secrets redacted (a table of settings; --json for all).
    Config,
    /// Publish a message as the broker (no ACL applies).
    Publish(PublishArgs),
    /// Reload what can change at runtime, as SIGHUP does; prints what was reloaded and what
    /// needs a restart.
    Reload,
    /// The cluster: status, join, leave (also `mqttd cluster`).
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// Page options of the lists.
#[derive(Debug, Args)]
struct Page {
    /// Page number, from 1.
    #[arg(long)]
    page: Option<usize>,
    /// Items per page (the API's default 100, at most 1000).
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum ClientsCommand {
    /// List clients (and sessions without a connection), by client id.
    List {
        /// Only client ids starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only clients with this user name.
        #[arg(long)]
        username: Option<String>,
        /// Only clients over this transport (tcp, tls, ws, wss, quic, p2p, bridge).
        #[arg(long)]
        transport: Option<String>,
        /// Only connected clients.
        #[arg(long)]
        connected: bool,
        #[command(flatten)]
        page: Page,
    },
    /// Show one client in full.
    Show {
        /// Client identifier.
        client_id: String,
    },
    /// Disconnect a client (DISCONNECT 0x98 for MQTT 5); its session stays if it outlives
    /// the connection.
    Kick {
        /// Client identifier.
        client_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List sessions, by client id.
    List {
        /// Only client ids starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only sessions held offline.
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        page: Page,
    },
    /// Show one session.
    Show {
        /// Client identifier.
        client_id: String,
    },
    /// End a session held offline, as its expiry would.
    Delete {
        /// Client identifier.
        client_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum RetainedCommand {
    /// List retained messages, by topic.
    List {
        /// Topic filter they match (default '#').
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Show a retained message with its payload.
    Show {
        /// Topic.
        topic: String,
    },
    /// Delete the retained message of a topic.
    Delete {
        /// Topic.
        topic: String,
    },
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// Topic (no wildcards).
    topic: String,
    /// Payload (UTF-8 text, or base64 with --base64).
    #[arg(default_value = "")]
    payload: String,
    /// QoS: 0, 1 or 2.
    #[arg(long, short = 'q', default_value_t = 0)]
    qos: u8,
    /// Retain the message.
    #[arg(long, short = 'r')]
    retain: bool,
    /// The payload is base64.
    #[arg(long)]
    base64: bool,
}

/// Why a command failed, with its exit status.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: i32,
    pub(crate) message: String,
    /// The API's answer, if it gave one.
    body: String,
}

impl Failure {
    fn no_answer(error: anyhow::Error) -> Self {
        Self {
            status: EXIT_NO_ANSWER,
            message: format!("{error:#}"),
            body: String::new(),
        }
    }
}

/// Runs a `mqttd ctl` command: what it prints goes to standard output.
pub(crate) async fn run(args: CtlArgs) -> Result<(), Failure> {
    let api = Api::new(&args.api).map_err(Failure::no_answer)?;
    let json = args.api.json;
    let (method, path, body) = request_of(&args.command);
    let answer = api.send(method, &path, body).await.inspect_err(|failure| {
        // Scripts get the error's JSON too, on standard output.
        if json && !failure.body.is_empty() {
            println!("{}", failure.body);
        }
    })?;
    if json {
        if !answer.is_empty() {
            println!("{answer}");
        }
        return Ok(());
    }
    let value: Value = match answer.is_empty() {
        true => Value::Null,
        false => serde_json::from_str(&answer)
            .map_err(|e| Failure::no_answer(anyhow::anyhow!("not a JSON answer: {e}")))?,
    };
    print!("{}", render(&args.command, &value));
    Ok(())
}

/// The request a command makes.
fn request_of(command: &CtlCommand) -> (reqwest::Method, String, Option<Value>) {
    use reqwest::Method;
    let get = |path: String| (Method::GET, path, None);
    let delete = |path: String| (Method::DELETE, path, None);
    match command {
        CtlCommand::Clients(ClientsCommand::List {
            prefix,
            username,
            transport,
            connected,
            page,
        }) => get(with_query(
            "clients",
            &[
                ("client_id_prefix", prefix.clone()),
                ("username", username.clone()),
                ("transport", transport.clone()),
                ("connected", connected.then(|| "true".to_owned())),
                ("page", page.page.map(|p| p.to_string())),
                ("limit", page.limit.map(|l| l.to_string())),
            ],
        )),
        CtlCommand::Clients(ClientsCommand::Show { client_id }) => {
            get(format!("clients/{}", encode(client_id, false)))
        }
        CtlCommand::Clients(ClientsCommand::Kick { client_id }) => {
            delete(format!("clients/{}", encode(client_id, false)))
        }
        CtlCommand::Sessions(SessionsCommand::List {
            prefix,
            offline,
            page,
        }) => get(with_query(
            "sessions",
            &[
                ("client_id_prefix", prefix.clone()),
                ("connected", offline.then(|| "false".to_owned())),
                ("page", page.page.map(|p| p.to_string())),
                ("limit", page.limit.map(|l| l.to_string())),
            ],
        )),
        CtlCommand::Sessions(SessionsCommand::Show { client_id }) => {
            get(format!("sessions/{}", encode(client_id, false)))
        }
        CtlCommand::Sessions(SessionsCommand::Delete { client_id }) => {
            delete(format!("sessions/{}", encode(client_id, false)))
        }
        CtlCommand::Subscriptions {
            client_id: Some(client_id),
            filter: None,
            topic: None,
            client: None,
            page: Page {
                page: None,
                limit: None,
            },
        } => get(format!(
            "clients/{}/subscriptions",
            encode(client_id, false)
        )),
        CtlCommand::Subscriptions {
            client_id,
            filter,
            topic,
            client,
            page,
        } => get(with_query(
            "subscriptions",
            &[
                ("filter", filter.clone()),
                ("topic", topic.clone()),
                ("client_id", client.clone().or_else(|| client_id.clone())),
                ("page", page.page.map(|p| p.to_string())),
                ("limit", page.limit.map(|l| l.to_string())),
            ],
        )),
        CtlCommand::Retained(RetainedCommand::List { filter, page }) => get(with_query(
            "retained",
            &[
                ("filter", filter.clone()),
                ("page", page.page.map(|p| p.to_string())),
                ("limit", page.limit.map(|l| l.to_string())),
            ],
        )),
        CtlCommand::Retained(RetainedCommand::Show { topic }) => {
            get(format!("retained/{}", encode(topic, true)))
        }
        CtlCommand::Retained(RetainedCommand::Delete { topic }) => {
            delete(format!("retained/{}", encode(topic, true)))
        }
        CtlCommand::Listeners => get("listeners".into()),
        CtlCommand::Stats => get("stats".into()),
        CtlCommand::Bridges => get("bridges".into()),
        CtlCommand::Peers => get("p2p/peers".into()),
        CtlCommand::Config => get("config".into()),
        CtlCommand::Publish(p) => (
            Method::POST,
            "publish".into(),
            Some(json!({
                "topic": p.topic,
                "payload": p.payload,
                "payload_encoding": if p.base64 { "base64" } else { "plain" },
                "qos": p.qos,
                "retain": p.retain,
            })),
        ),
        CtlCommand::Reload => (Method::POST, "reload".into(), None),
        CtlCommand::Cluster(ClusterCommand::Status) => get("cluster".into()),
        CtlCommand::Cluster(ClusterCommand::Join { seed }) => (
            Method::POST,
            "cluster/join".into(),
            Some(match seed {
                Some(seed) => json!({ "seed": seed }),
                None => json!({}),
            }),
        ),
        CtlCommand::Cluster(ClusterCommand::Leave { node_id }) => (
            Method::POST,
            "cluster/leave".into(),
            Some(match node_id {
                Some(id) => json!({ "node_id": id }),
                None => json!({}),
            }),
        ),
    }
}

/// `path` with the query parameters that are set.
fn with_query(path: &str, params: &[(&str, Option<String>)]) -> String {
    let query: Vec<String> = params
        .iter()
        .filter_map(|(name, value)| Some(format!("{name}={}", encode(value.as_deref()?, false))))
        .collect();
    match query.is_empty() {
        true => path.to_owned(),
        false => format!("{path}?{}", query.join("&")),
    }
}

/// Percent-encodes all but unreserved characters (and '/' when `slashes`, for topics, whose
/// levels the API takes as they are).
fn encode(text: &str, slashes: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(byte));
            }
            b'/' if slashes => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The API, with its key.
struct Api {
    client: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn new(args: &ApiFlags) -> anyhow::Result<Self> {
        let url = args
            .url
            .clone()
            .or_else(|| {
                std::env::var("MQTTD_API_URL")
                    .ok()
                    .filter(|u| !u.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let base = url.trim_end_matches('/');
        let base = base.strip_suffix("/api/v1").unwrap_or(base);
        let base = format!("{base}/api/v1/");
        let key = key(args)?;
        // https:// URLs need a crypto provider; reqwest is built without its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot set up the HTTP client")?;
        Ok(Self { client, base, key })
    }

    /// Sends one request; the answer's body when it succeeded.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<String, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .client
            .request(method, &url)
            .bearer_auth(&self.key)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {url}"))
            .map_err(Failure::no_answer)?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("cannot read the answer of {url}"))
            .map_err(Failure::no_answer)?;
        if status.is_success() {
            return Ok(text);
        }
        let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let code = error["code"].as_str().unwrap_or("");
        let message = error["message"].as_str().unwrap_or(&text);
        let mut line = match status {
            reqwest::StatusCode::UNAUTHORIZED => format!(
                "no or wrong API key ({code}: {message}); give one with --key, --key-file or \
                 $MQTTD_API_KEY (create one with `mqttd api-key create NAME`)"
            ),
            _ if code.is_empty() => format!("HTTP {status}: {message}"),
            _ => format!("{code}: {message}"),
        };
        if error["restart_needed"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            line.push_str(&format!(
                "\n(changed settings that need a restart: {})",
                join(&error["restart_needed"])
            ));
        }
        Err(Failure {
            status: EXIT_API_ERROR,
            message: line,
            body: text,
        })
    }
}

/// The API key, from the first source that has one (see [`AFTER_HELP`]).
fn key(args: &ApiFlags) -> anyhow::Result<String> {
    let from_file = |path: &std::path::Path| -> anyhow::Result<String> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API key file {}", path.display()))?;
        let key = text.trim();
        anyhow::ensure!(
            !key.is_empty(),
            "the API key file {} is empty",
            path.display()
        );
        Ok(key.to_owned())
    };
    if let Some(key) = &args.key {
        return Ok(key.trim().to_owned());
    }
    if let Some(path) = &args.key_file {
        return from_file(path);
    }
    if let Some(key) = std::env::var("MQTTD_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
    {
        return Ok(key.trim().to_owned());
    }
    if let Some(path) = std::env::var_os("MQTTD_API_KEY_FILE").filter(|p| !p.is_empty()) {
        return from_file(std::path::Path::new(&path));
    }
    anyhow::bail!(
        "no API key: give one with --key, --key-file or $MQTTD_API_KEY \
         (create one with `mqttd api-key create NAME`)"
    )
}

// ---- Output ---------------------------------------------------------------------------------

/// What a command prints for the API's answer `v`.
fn render(command: &CtlCommand, v: &Value) -> String {
    match command {
        CtlCommand::Clients(ClientsCommand::List { .. }) => page(
            v,
            &[
                ("CLIENT ID", "client_id"),
                ("CONNECTED", "connected"),
                ("USERNAME", "username"),
                ("TRANSPORT", "transport"),
                ("PEER", "peer_addr"),
                ("VERSION", "protocol_version"),
                ("SUBS", "subscriptions"),
                ("QUEUED", "queued"),
                ("INFLIGHT", "in_flight"),
            ],
        ),
        CtlCommand::Clients(ClientsCommand::Show { .. }) => {
            let mut out = fields(v, &["subscription_list"]);
            let subs = &v["subscription_list"];
            if subs.as_array().is_some_and(|s| !s.is_empty()) {
                out.push('\n');
                out.push_str(&subscriptions(subs));
            }
            out
        }
        CtlCommand::Clients(ClientsCommand::Kick { client_id }) => {
            format!("client {client_id:?} disconnected\n")
        }
        CtlCommand::Sessions(SessionsCommand::List { .. }) => page(
            v,
            &[
                ("CLIENT ID", "client_id"),
                ("STATE", "state"),
                ("PERSISTENT", "persistent"),
                ("EXPIRY", "expiry_interval"),
                ("SUBS", "subscriptions"),
                ("QUEUED", "queued"),
                ("INFLIGHT", "in_flight"),
            ],
        ),
        CtlCommand::Sessions(SessionsCommand::Show { .. })
        | CtlCommand::Retained(RetainedCommand::Show { .. })
        | CtlCommand::Stats => fields(v, &[]),
        CtlCommand::Sessions(SessionsCommand::Delete { client_id }) => {
            format!("session {client_id:?} ended\n")
        }
        // One client's, from its own endpoint: a bare list.
        CtlCommand::Subscriptions { .. } if v.is_array() => subscriptions(v),
        CtlCommand::Subscriptions { .. } => page(
            v,
            &[
                ("CLIENT ID", "client_id"),
                ("FILTER", "filter"),
                ("QOS", "qos"),
                ("CONNECTED", "connected"),
                ("NO LOCAL", "no_local"),
                ("RAP", "retain_as_published"),
                ("RH", "retain_handling"),
                ("ID", "subscription_id"),
            ],
        ),
        CtlCommand::Bridges => table(
            v.as_array().map(Vec::as_slice).unwrap_or_default(),
            &[
                ("NAME", "name"),
                ("STATE", "state"),
                ("TRANSPORT", "transport"),
                ("REMOTE", "remote"),
                ("IN", "messages_in"),
                ("OUT", "messages_out"),
                ("DROPPED", "messages_dropped"),
                ("QUEUED", "queued"),
                ("RECONNECTS", "reconnects"),
                ("LAST ERROR", "last_error"),
            ],
        ),
        CtlCommand::Peers => table(
            v.as_array().map(Vec::as_slice).unwrap_or_default(),
            &[
                ("NODE ID", "node_id"),
                ("ROLE", "role"),
                ("NAME", "name"),
                ("PATH", "path"),
                ("REMOTE", "remote"),
                ("RTT MS", "rtt_ms"),
                ("LOST", "lost_packets"),
                ("SINCE", "connected_at"),
            ],
        ),
        CtlCommand::Config => {
            let mut lines = Vec::new();
            flatten("", &v["config"], &mut lines);
            let mut out = aligned(&lines);
            if v["restart_needed"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                out.push_str(&format!(
                    "(changed by a reload, waiting for a restart: {})\n",
                    join(&v["restart_needed"])
                ));
            }
            out
        }
        CtlCommand::Retained(RetainedCommand::List { .. }) => page(
            v,
            &[
                ("TOPIC", "topic"),
                ("QOS", "qos"),
                ("BYTES", "payload_bytes"),
            ],
        ),
        CtlCommand::Retained(RetainedCommand::Delete { topic }) => {
            format!("retained message on {topic:?} deleted\n")
        }
        CtlCommand::Listeners => table(
            v.as_array().map(Vec::as_slice).unwrap_or_default(),
            &[
                ("URL", "url"),
                ("KIND", "kind"),
                ("ADDRESS", "addr"),
                ("CLIENTS", "clients"),
            ],
        ),
        CtlCommand::Publish(_) => format!("published; routed to {} sessions\n", cell(&v["routed"])),
        CtlCommand::Reload => {
            let mut out = format!("reloaded: {}\n", join(&v["reloaded"]));
            if v["bridges"].as_array().is_some_and(|b| !b.is_empty()) {
                out.push_str(&format!("bridges: {}\n", join(&v["bridges"])));
            }
            match v["restart_needed"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                true => out.push_str(&format!(
                    "needs a restart to take effect: {}\n",
                    join(&v["restart_needed"])
                )),
                false => out.push_str("nothing needs a restart\n"),
            }
            out
        }
        CtlCommand::Cluster(ClusterCommand::Status) => cluster_status(v),
        CtlCommand::Cluster(ClusterCommand::Join { .. }) => {
            format!("joined; {}", cluster_status(v))
        }
        CtlCommand::Cluster(ClusterCommand::Leave { node_id }) => {
            let who = node_id.map_or_else(|| "this node".to_owned(), |id| format!("node {id}"));
            format!("{who} left the cluster\n{}", cluster_status(v))
        }
    }
}

/// `GET /api/v1/cluster` for people: this node, then a table of the members.
fn cluster_status(v: &Value) -> String {
    let leader = match v["leader"].as_u64() {
        Some(id) => {
            let name = v["members"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["node_id"].as_u64() == Some(id)))
                .map(|m| cell(&m["name"]));
            match name {
                Some(name) => format!("{id} ({name})"),
                None => id.to_string(),
            }
        }
        None => "none known".to_owned(),
    };
    let lines = vec![
        vec![
            "node".to_owned(),
            format!(
                "{} ({}, {})",
                cell(&v["node_id"]),
                cell(&v["name"]),
                cell(&v["addr"])
            ),
        ],
        vec!["state".to_owned(), cell(&v["state"])],
        vec!["leader".to_owned(), leader],
        vec![
            "quorum".to_owned(),
            match v["in_quorum"].as_bool() {
                Some(true) => "confirmed".to_owned(),
                Some(false) => "not confirmed (cut off from a majority, or no leader)".to_owned(),
                None => cell(&v["in_quorum"]),
            },
        ],
        vec!["term".to_owned(), cell(&v["term"])],
        vec!["incarnation".to_owned(), cell(&v["incarnation"])],
        vec!["last log index".to_owned(), cell(&v["last_log_index"])],
        vec!["last applied".to_owned(), cell(&v["last_applied"])],
    ];
    let mut lines = lines;
    lines.push(vec![
        "forwarded".to_owned(),
        format!(
            "{} out, {} in, {} dropped",
            cell(&v["forwarded_out"]),
            cell(&v["forwarded_in"]),
            cell(&v["forward_dropped"])
        ),
    ]);
    lines.push(vec![
        "sessions".to_owned(),
        format!(
            "{} persistent, {} wills due",
            cell(&v["sessions"]),
            cell(&v["wills_due"])
        ),
    ]);
    let mut out = aligned(&lines);
    out.push('\n');
    // Each member's routes (as this node holds them) as columns of its own row.
    let members: Vec<Value> = v["members"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let mut m = m.clone();
            let routes = m["routes"].clone();
            if let Some(row) = m.as_object_mut() {
                row.insert("route_count".into(), routes["count"].clone());
                row.insert("route_digest".into(), routes["digest"].clone());
                row.insert(
                    "link".into(),
                    match routes["link_up"].as_bool() {
                        Some(true) => "up".into(),
                        Some(false) => "down".into(),
                        None => Value::Null,
                    },
                );
            }
            m
        })
        .collect();
    out.push_str(&table(
        &members,
        &[
            ("NODE", "node_id"),
            ("NAME", "name"),
            ("ADDRESS", "addr"),
            ("ROLE", "role"),
            ("INCARNATION", "incarnation"),
            ("MATCHED", "matched"),
            ("ROUTES", "route_count"),
            ("DIGEST", "route_digest"),
            ("LINK", "link"),
        ],
    ));
    out
}

/// A list answer (`data` and `meta`): its table, and a line on the pages if there are more.
fn page(v: &Value, columns: &[(&str, &str)]) -> String {
    let rows = v["data"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut out = table(rows, columns);
    let meta = &v["meta"];
    if meta["has_next"].as_bool() == Some(true) {
        out.push_str(&format!(
            "(page {} of {} items, {} per page: --page {} for more)\n",
            cell(&meta["page"]),
            cell(&meta["count"]),
            cell(&meta["limit"]),
            meta["page"].as_u64().unwrap_or(1) + 1
        ));
    }
    out
}

fn subscriptions(v: &Value) -> String {
    table(
        v.as_array().map(Vec::as_slice).unwrap_or_default(),
        &[
            ("FILTER", "filter"),
            ("QOS", "qos"),
            ("NO LOCAL", "no_local"),
            ("RETAIN AS PUBLISHED", "retain_as_published"),
            ("RETAIN HANDLING", "retain_handling"),
            ("ID", "subscription_id"),
        ],
    )
}

/// A configuration's settings as `key value` lines, nested tables as dotted keys
/// (`quic.idle_timeout`), arrays of tables by index (`bridge.0.name`).
fn flatten(prefix: &str, v: &Value, lines: &mut Vec<Vec<String>>) {
    let key = |name: &str| match prefix.is_empty() {
        true => name.to_owned(),
        false => format!("{prefix}.{name}"),
    };
    match v {
        Value::Object(map) => {
            for (name, value) in map {
                flatten(&key(name), value, lines);
            }
        }
        Value::Array(items) if items.iter().any(Value::is_object) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&key(&i.to_string()), item, lines);
            }
        }
        other => lines.push(vec![prefix.to_owned(), cell(other)]),
    }
}

/// Rows under a header, each column as wide as its widest cell.
fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let mut lines: Vec<Vec<String>> = vec![columns.iter().map(|(h, _)| (*h).to_owned()).collect()];
    lines.extend(
        rows.iter()
            .map(|row| columns.iter().map(|(_, key)| cell(&row[*key])).collect()),
    );
    aligned(&lines)
}

/// An object's fields, one per line (`skip`: those shown otherwise).
fn fields(v: &Value, skip: &[&str]) -> String {
    let Some(object) = v.as_object() else {
        return format!("{}\n", cell(v));
    };
    let lines: Vec<Vec<String>> = object
        .iter()
        .filter(|(name, _)| !skip.contains(&name.as_str()))
        .map(|(name, value)| vec![name.clone(), cell(value)])
        .collect();
    aligned(&lines)
}

/// Lines of cells, padded into columns (the last one is not padded).
fn aligned(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (c, value) in line.iter().enumerate() {
            if c + 1 < line.len() {
                let width = widths.get(c).copied().unwrap_or(0);
                text.push_str(&format!("{value:<width$}  "));
            } else {
                text.push_str(value);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// One value as a table shows it: `-` for none.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "\"\"".into(),
        Value::String(s) => s.escape_debug().to_string(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The strings of an array, with commas, or `-`.
fn join(v: &Value) -> String {
    match v.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns_and_show_missing_values_as_dashes() {
        let rows = vec![
            json!({"client_id": "a", "connected": true, "username": null}),
            json!({"client_id": "longer-id", "connected": false, "username": "bob"}),
        ];
        let text = table(
            &rows,
            &[
                ("CLIENT ID", "client_id"),
                ("CONNECTED", "connected"),
                ("USERNAME", "username"),
            ],
        );
        assert_eq!(
            text,
            "CLIENT ID  CONNECTED  USERNAME\n\
             a          true       -\n\
             longer-id  false      bob\n"
        );
    }

    #[test]
    fn a_configuration_flattens_into_dotted_keys() {
        let mut lines = Vec::new();
        flatten(
            "",
            &json!({"max_qos": 2, "quic": {"http3": true}, "bridge": [{"name": "b", "password": "***"}], "listen": ["tcp://x"]}),
            &mut lines,
        );
        let text = aligned(&lines);
        assert!(text.contains("quic.http3"), "{text}");
        assert!(text.contains("bridge.0.password  ***"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().eq(["listen", "tcp://x"])),
            "{text}"
        );
    }

    #[test]
    fn paths_and_queries_are_percent_encoded_but_topic_levels_stay() {
        assert_eq!(encode("a b/c#", false), "a%20b%2Fc%23");
        assert_eq!(encode("sensors/+/t", true), "sensors/%2B/t");
        assert_eq!(
            with_query("retained", &[("filter", Some("#".into())), ("page", None)]),
            "retained?filter=%23"
        );
    }
}
