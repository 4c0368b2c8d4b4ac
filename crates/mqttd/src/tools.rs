//! `mqttd pub` and `mqttd sub`: command-line clients that take `mosquitto_pub` and
//! `mosquitto_sub`'s flags, over TCP, TLS, WebSocket, WebSocket over TLS, QUIC or a
//! peer-to-peer node connection (`p2p://NODE_ID`).
//!
//! Every failure maps to one [`Status`], so that scripts can tell a broker that is down from a
//! certificate that does not verify, a password the broker refused, or a subscription an ACL
//! denied.

use std::io::Write;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bytes::Bytes;
use clap::Args;
use mqttd_client::transport::TlsError;
use mqttd_client::{
    connect_to, Client, ConnectError, Connector, Endpoint, Events, ServerUrl, TlsOptions,
    TlsVersion, Transport, TransportError, ZeroRtt,
};
use mqttd_proto::client::{ClientConfig, Event};
use mqttd_proto::session::Enqueued;
use mqttd_proto::{
    ClientId, ConnAck, Message, MessageProperties, MqttStr, ProtocolVersion, QoS, ReasonCode,
    SubscribeProperties, Subscription, SubscriptionOptions, TopicFilter, TopicName, UserProperty,
    Will, WillProperties,
};
use tokio::io::AsyncBufReadExt;

use crate::format::{Format, Received};

/// The exit statuses of `mqttd pub` and `mqttd sub` (also in their `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Anything else: the connection was lost, an output could not be written.
    Failed = 1,
    /// A flag, topic, property or file is wrong (clap's own usage errors exit 2 as well).
    Usage = 2,
    /// The broker could not be reached: unknown host, connection refused, unreachable,
    /// timed out, WebSocket upgrade refused.
    Unreachable = 3,
    /// The TLS handshake failed; the message names the check (unknown CA, name mismatch,
    /// expired).
    Tls = 4,
    /// The broker refused the connection (CONNACK): bad user name or password, not
    /// authorized, client identifier refused.
    Refused = 5,
    /// The broker refused every subscription (SUBACK).
    SubscribeRefused = 6,
    /// The broker refused a publication (PUBACK or PUBREC).
    PublishRefused = 7,
    /// `sub -W`: the time ran out (Mosquitto's status for it).
    Timeout = 27,
}

/// The text `--help` ends with.
pub(crate) const EXIT_STATUS_HELP: &str = "\
Exit status:
  0   success
  1   other failure (connection lost, output error)
  2   usage error (flags, topic, -D property, unreadable file)
  3   broker unreachable (unknown host, connection refused, timeout, WebSocket upgrade refused)
  4   TLS handshake failed (unknown CA, host name mismatch, expired certificate, ...)
  5   connection refused by the broker (bad user name or password, not authorized, ...)
  6   subscription refused by the broker (every filter of the SUBSCRIBE)
  7   publication refused by the broker (PUBACK/PUBREC error)
  27  sub -W: timed out";

/// A failed run: the status to exit with and the message for standard error.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: Status,
    pub(crate) error: anyhow::Error,
}

type Outcome<T = ()> = Result<T, Failure>;

fn fail(status: Status, error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        status,
        error: error.into(),
    }
}

fn usage(message: impl std::fmt::Display) -> Failure {
    fail(Status::Usage, anyhow!("{message}"))
}

trait OrStatus<T> {
    fn or_status(self, status: Status) -> Outcome<T>;
}

impl<T, E: Into<anyhow::Error>> OrStatus<T> for Result<T, E> {
    fn or_status(self, status: Status) -> Outcome<T> {
        self.map_err(|e| fail(status, e))
    }
}

/// Connection options shared by `pub` and `sub`, with Mosquitto's names.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Broker host [default: localhost].
    #[arg(short = 'h', long, short_alias = 'H', value_name = "HOST")]
    host: Option<String>,
    /// Broker port [default: 1883; 8883 with TLS; 8083 for ws://, 8084 for wss://, 14567 for
    /// quic://].
    #[arg(short, long)]
    port: Option<u16>,
    /// Broker URL: mqtt:// mqtts:// ws:// wss:// or quic://, then USER:PASSWORD@HOST:PORT/PATH
    /// where all but the host are optional; or p2p://USER:PASSWORD@NODE_ID/PATH, the broker's
    /// peer-to-peer node (see --relay and --peer-addr).
    /// For mqtt(s)://, quic:// and p2p:// the path is the topic; for ws(s):// it is the
    /// WebSocket path [default: /mqtt].
    #[arg(short = 'L', long = "url", value_name = "URL", conflicts_with_all = ["host", "port"])]
    url: Option<String>,
    /// Client identifier [default: the broker assigns one].
    #[arg(short, long, value_name = "ID")]
    id: Option<String>,
    /// Client identifier prefix; the process id is appended.
    #[arg(short = 'I', long, value_name = "PREFIX", conflicts_with = "id")]
    id_prefix: Option<String>,
    /// User name.
    #[arg(short, long)]
    username: Option<String>,
    /// Password.
    #[arg(
        short = 'P',
        long = "pw",
        visible_alias = "password",
        value_name = "PASSWORD"
    )]
    password: Option<String>,
    /// MQTT version: mqttv5, mqttv311, mqttv31 (or 5, 311, 31).
    #[arg(
        short = 'V',
        long = "protocol-version",
        alias = "protocol",
        default_value = "5",
        value_name = "VERSION"
    )]
    protocol: String,
    /// Keep alive in seconds.
    #[arg(short, long, default_value_t = 60, value_name = "SECS")]
    keepalive: u16,
    /// Resume the session instead of starting clean (needs -i). With MQTT 5 the session then
    /// never expires unless -x says otherwise.
    #[arg(short = 'c', long = "disable-clean-session", alias = "no-clean")]
    no_clean: bool,
    /// Session expiry interval in seconds (MQTT 5); -1 for never.
    #[arg(
        short = 'x',
        long = "session-expiry",
        value_name = "SECS",
        allow_negative_numbers = true
    )]
    session_expiry: Option<i64>,
    /// An MQTT 5 property: -D COMMAND NAME VALUE, or -D COMMAND user-property KEY VALUE.
    /// Commands and names: connect (session-expiry-interval, receive-maximum,
    /// maximum-packet-size, topic-alias-maximum), publish and will (message-expiry-interval,
    /// content-type, response-topic, correlation-data, payload-format-indicator; will also
    /// will-delay-interval), subscribe (subscription-identifier), disconnect
    /// (session-expiry-interval); user-property for every command.
    #[arg(
        short = 'D',
        long = "property",
        num_args = 3..=4,
        value_names = ["COMMAND", "NAME", "VALUE"],
        action = clap::ArgAction::Append
    )]
    property: Vec<String>,
    /// Print what the client sends and receives on standard error.
    #[arg(short, long)]
    debug: bool,
    /// Will topic: the broker publishes the will if the connection ends without DISCONNECT.
    #[arg(long, value_name = "TOPIC")]
    will_topic: Option<String>,
    /// Will payload.
    #[arg(long, value_name = "PAYLOAD", requires = "will_topic")]
    will_payload: Option<String>,
    /// Will QoS.
    #[arg(long, value_name = "QOS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    will_qos: u8,
    /// Retain the will.
    #[arg(long, requires = "will_topic")]
    will_retain: bool,
    /// PEM file of the CA certificates that sign the broker's certificate; enables TLS.
    #[arg(long, value_name = "FILE")]
    cafile: Option<PathBuf>,
    /// Directory of PEM files of CA certificates to trust (every certificate in every file;
    /// with --cafile, both); enables TLS.
    #[arg(long, value_name = "DIR")]
    capath: Option<PathBuf>,
    /// The TLS version to speak: tlsv1.3 or tlsv1.2 [default: either, as the broker
    /// prefers].
    #[arg(long, value_name = "VERSION")]
    tls_version: Option<TlsVersion>,
    /// PEM file of the client certificate (with --key); enables TLS.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM file of the client's private key.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Do not check that the broker's certificate names the host (the chain is still
    /// verified).
    #[arg(long)]
    insecure: bool,
    /// QUIC (quic:// and p2p:// URLs): data streams besides the control stream. Each topic's
    /// messages and each subscription go on the data stream the topic (filter) hashes to; 0
    /// carries everything on one stream.
    #[arg(long, value_name = "N", default_value_t = 0)]
    quic_streams: u16,
    /// p2p:// URLs: a relay (https://HOST:PORT) the broker's node is reached through, unless
    /// a direct address works; repeatable.
    #[arg(long = "relay", value_name = "URL")]
    relays: Vec<String>,
    /// p2p:// URLs: PEM CA certificates the relays' certificates are checked against (a
    /// broker's generated <data_dir>/tls/ca.pem), besides the compiled-in Mozilla roots.
    #[arg(long, value_name = "FILE")]
    relay_cafile: Option<PathBuf>,
    /// p2p:// URLs: a UDP address the broker's node may be reached at directly; repeatable.
    #[arg(long = "peer-addr", value_name = "IP:PORT")]
    peer_addrs: Vec<std::net::SocketAddr>,
    /// p2p:// URLs: this client's node key file, created if missing [default: a new key each
    /// run].
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Seconds allowed to reach the broker: TCP connect, TLS, QUIC (at most 10) and WebSocket
    /// handshakes.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    connect_timeout: u64,
}

/// The broker and credentials from the flags and the URL.
struct Target {
    endpoint: Endpoint,
    username: Option<String>,
    password: Option<String>,
    /// The URL's topic (mqtt:// and mqtts:// URLs).
    topic: Option<String>,
}

/// MQTT 5 properties from `-D`.
#[derive(Debug, Default)]
struct Properties {
    connect_user: Vec<UserProperty>,
    session_expiry: Option<u32>,
    receive_maximum: Option<u16>,
    maximum_packet_size: Option<u32>,
    topic_alias_maximum: Option<u16>,
    publish: MessageProperties,
    publish_expiry: Option<u32>,
    will: WillProperties,
    subscribe: SubscribeProperties,
    disconnect_expiry: Option<u32>,
}

impl Properties {
    /// Parses the values of every `-D` in order (clap hands them over as one list: a
    /// user-property takes two values, every other property one); `allowed` are the commands
    /// this tool sends.
    fn parse(tokens: &[String], allowed: &[&str]) -> Outcome<Self> {
        let mut p = Self::default();
        let mut rest = tokens;
        while !rest.is_empty() {
            let [command, name, tail @ ..] = rest else {
                return Err(usage("-D needs COMMAND NAME VALUE"));
            };
            let arity = if name == "user-property" { 2 } else { 1 };
            let Some((values, tail)) = tail.split_at_checked(arity) else {
                return Err(usage(format!("-D {command} {name}: missing value")));
            };
            rest = tail;
            let (command, name) = (command.as_str(), name.as_str());
            if !allowed.contains(&command) {
                return Err(usage(format!(
                    "-D {command}: this tool sends no such packet (commands: {})",
                    allowed.join(", ")
                )));
            }
            let what = || format!("-D {command} {name}");
            if name == "user-property" {
                let [key, value] = values else {
                    return Err(usage(format!("{}: needs KEY VALUE", what())));
                };
                let pair = (mqtt_str(key, &what)?, mqtt_str(value, &what)?);
                match command {
                    "connect" => p.connect_user.push(pair),
                    "publish" => p.publish.user_properties.push(pair),
                    "will" => p.will.user_properties.push(pair),
                    "subscribe" => p.subscribe.user_properties.push(pair),
                    _ => return Err(usage(format!("{}: not supported", what()))),
                }
                continue;
            }
            let [value] = values else {
                return Err(usage(format!("{}: needs one VALUE", what())));
            };
            match (command, name) {
                ("connect", "session-expiry-interval") => {
                    p.session_expiry = Some(number(value, &what)?)
                }
                ("connect", "receive-maximum") => p.receive_maximum = Some(number(value, &what)?),
                ("connect", "maximum-packet-size") => {
                    p.maximum_packet_size = Some(number(value, &what)?)
                }
                ("connect", "topic-alias-maximum") => {
                    p.topic_alias_maximum = Some(number(value, &what)?)
                }
                ("disconnect", "session-expiry-interval") => {
                    p.disconnect_expiry = Some(number(value, &what)?)
                }
                ("subscribe", "subscription-identifier") => {
                    let id: u32 = number(value, &what)?;
                    let id = NonZeroU32::new(id)
                        .filter(|id| id.get() <= 268_435_455)
                        .ok_or_else(|| usage(format!("{}: 1 to 268435455", what())))?;
                    p.subscribe.subscription_identifier = Some(id);
                }
                ("will", "will-delay-interval") => {
                    p.will.will_delay_interval = Some(number(value, &what)?)
                }
                ("publish", "message-expiry-interval") => {
                    p.publish_expiry = Some(number(value, &what)?)
                }
                ("will", "message-expiry-interval") => {
                    p.will.message_expiry_interval = Some(number(value, &what)?)
                }
                ("publish", "content-type") => {
                    p.publish.content_type = Some(mqtt_str(value, &what)?)
                }
                ("will", "content-type") => p.will.content_type = Some(mqtt_str(value, &what)?),
                ("publish", "response-topic") => {
                    p.publish.response_topic = Some(topic_name(value, &what)?)
                }
                ("will", "response-topic") => {
                    p.will.response_topic = Some(topic_name(value, &what)?)
                }
                ("publish", "correlation-data") => {
                    p.publish.correlation_data = Some(Bytes::from(value.clone()))
                }
                ("will", "correlation-data") => {
                    p.will.correlation_data = Some(Bytes::from(value.clone()))
                }
                ("publish", "payload-format-indicator") => {
                    p.publish.payload_format_indicator = Some(flag(value, &what)?)
                }
                ("will", "payload-format-indicator") => {
                    p.will.payload_format_indicator = Some(flag(value, &what)?)
                }
                _ => {
                    return Err(usage(format!(
                        "{}: unknown or unsupported property",
                        what()
                    )))
                }
            }
        }
        Ok(p)
    }

    fn is_empty(&self) -> bool {
        self.connect_user.is_empty()
            && self.session_expiry.is_none()
            && self.receive_maximum.is_none()
            && self.maximum_packet_size.is_none()
            && self.topic_alias_maximum.is_none()
            && self.publish == MessageProperties::default()
            && self.publish_expiry.is_none()
            && self.will == WillProperties::default()
            && self.subscribe == SubscribeProperties::default()
            && self.disconnect_expiry.is_none()
    }
}

fn number<T: std::str::FromStr>(value: &str, what: &dyn Fn() -> String) -> Outcome<T> {
    value
        .parse()
        .map_err(|_| usage(format!("{}: {value:?} is not a valid number", what())))
}

fn flag(value: &str, what: &dyn Fn() -> String) -> Outcome<bool> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(usage(format!("{}: 0 or 1", what()))),
    }
}

fn mqtt_str(value: &str, what: &dyn Fn() -> String) -> Outcome<MqttStr> {
    MqttStr::try_from(value).map_err(|e| usage(format!("{}: {e}", what())))
}

fn topic_name(value: &str, what: &dyn Fn() -> String) -> Outcome<TopicName> {
    TopicName::try_from(value).map_err(|e| usage(format!("{}: {value:?}: {e}", what())))
}

fn qos(value: u8) -> QoS {
    // clap's range check keeps other values out.
    QoS::from_bits(value).unwrap_or(QoS::AtMostOnce)
}

impl ConnectArgs {
    fn target(&self) -> Outcome<Target> {
        let mut tls = TlsOptions::default();
        tls.ca_file.clone_from(&self.cafile);
        tls.ca_path.clone_from(&self.capath);
        tls.version = self.tls_version;
        tls.cert_file.clone_from(&self.cert);
        tls.key_file.clone_from(&self.key);
        tls.insecure = self.insecure;
        let mut target = match &self.url {
            Some(url) => {
                let url: ServerUrl = url.parse().map_err(usage)?;
                Target {
                    endpoint: url.endpoint,
                    username: url.username,
                    password: url.password,
                    topic: url.topic,
                }
            }
            None => {
                let transport = if tls.is_set() {
                    Transport::Tls
                } else {
                    Transport::Tcp
                };
                let host = self.host.clone().unwrap_or_else(|| "localhost".into());
                let port = self.port.unwrap_or(transport.default_port());
                Target {
                    endpoint: Endpoint::new(transport, host, port),
                    username: None,
                    password: None,
                    topic: None,
                }
            }
        };
        // TLS files given with a plain URL turn on TLS on the same port, as in Mosquitto.
        if tls.is_set() {
            target.endpoint.transport = target.endpoint.transport.with_tls();
        }
        target.endpoint.tls = tls;
        if self.quic_streams > 0 && !target.endpoint.transport.is_quic() {
            return Err(usage("--quic-streams needs a quic:// or p2p:// URL"));
        }
        target.endpoint.quic.data_streams = self.quic_streams;
        let p2p = !self.relays.is_empty()
            || self.relay_cafile.is_some()
            || !self.peer_addrs.is_empty()
            || self.key_file.is_some();
        if p2p && target.endpoint.transport != Transport::P2p {
            return Err(usage(
                "--relay, --relay-cafile, --peer-addr and --key-file need a p2p:// URL",
            ));
        }
        target.endpoint.p2p.relays.clone_from(&self.relays);
        target
            .endpoint
            .p2p
            .relay_cafile
            .clone_from(&self.relay_cafile);
        target.endpoint.p2p.direct.clone_from(&self.peer_addrs);
        target.endpoint.p2p.key_file.clone_from(&self.key_file);
        target.endpoint.timeout = Duration::from_secs(self.connect_timeout.max(1));
        if self.username.is_some() {
            target.username.clone_from(&self.username);
        }
        if self.password.is_some() {
            target.password.clone_from(&self.password);
        }
        Ok(target)
    }

    fn version(&self) -> Outcome<ProtocolVersion> {
        match self.protocol.as_str() {
            "5" | "mqttv5" => Ok(ProtocolVersion::V5),
            "311" | "mqttv311" => Ok(ProtocolVersion::V3_1_1),
            "31" | "mqttv31" => Ok(ProtocolVersion::V3_1),
            other => Err(usage(format!(
                "-V {other:?}: expected mqttv5, mqttv311 or mqttv31 (5, 311, 31)"
            ))),
        }
    }

    fn config(&self, target: &Target, props: &Properties) -> Outcome<ClientConfig> {
        let version = self.version()?;
        if version != ProtocolVersion::V5 && !props.is_empty() {
            return Err(usage("-D properties need MQTT 5 (-V mqttv5)"));
        }
        let id = match (&self.id, &self.id_prefix) {
            (Some(id), _) => id.clone(),
            (None, Some(prefix)) => format!("{prefix}{}", std::process::id()),
            (None, None) if self.no_clean => {
                return Err(usage("-c needs a client identifier (-i ID)"));
            }
            // MQTT 3.1 servers may not assign one.
            (None, None) if version == ProtocolVersion::V3_1 => {
                format!("mqttd-{}", std::process::id())
            }
            (None, None) => String::new(),
        };
        let id = ClientId::try_from(id.as_str()).map_err(|e| usage(format!("-i: {e}")))?;
        let mut config = ClientConfig::new(id);
        config.version = version;
        config.keep_alive = self.keepalive;
        config.clean_start = !self.no_clean;
        config.session_expiry_interval = match (self.session_expiry, props.session_expiry) {
            (Some(secs), _) if secs < 0 => u32::MAX,
            (Some(secs), _) => u32::try_from(secs)
                .map_err(|_| usage(format!("-x {secs}: at most {}", u32::MAX)))?,
            (None, Some(secs)) => secs,
            // A persistent session that ends when the connection does would be pointless.
            (None, None) if self.no_clean => u32::MAX,
            (None, None) => 0,
        };
        if let Some(user) = &target.username {
            config.username =
                Some(MqttStr::try_from(user.as_str()).map_err(|e| usage(format!("-u: {e}")))?);
        }
        config.password = target.password.clone().map(Bytes::from);
        config.topic_alias_maximum = props.topic_alias_maximum.unwrap_or(64);
        if let Some(max) = props.receive_maximum {
            config.receive_maximum = max;
        }
        if let Some(max) = props.maximum_packet_size {
            config.max_packet_size = max;
        }
        config.user_properties = props.connect_user.clone();
        if let Some(topic) = &self.will_topic {
            config.will = Some(Will {
                topic: TopicName::try_from(topic.as_str())
                    .map_err(|e| usage(format!("--will-topic {topic:?}: {e}")))?,
                payload: Bytes::from(self.will_payload.clone().unwrap_or_default()),
                qos: qos(self.will_qos),
                retain: self.will_retain,
                properties: props.will.clone(),
            });
        }
        Ok(config)
    }

    fn debug(&self, line: impl std::fmt::Display) {
        if self.debug {
            eprintln!("Client {line}");
        }
    }

    async fn connect(
        &self,
        target: &Target,
        config: ClientConfig,
    ) -> Outcome<(Client, Events, ConnAck)> {
        let connector = Connector::new(target.endpoint.clone()).map_err(transport_failure)?;
        self.debug(format_args!(
            "sending CONNECT (id {:?}) to {}",
            config.client_id.as_str(),
            target.endpoint
        ));
        let (client, events, ack) = connect_to(&connector, config, None)
            .await
            .map_err(|e| connect_failure(e, target))?;
        self.debug(format_args!(
            "received CONNACK ({}){}",
            ack.reason,
            match &ack.properties.assigned_client_identifier {
                Some(id) => format!(", assigned client identifier {id}"),
                None => String::new(),
            }
        ));
        if let Some(id) = connector.node_id() {
            self.debug(format_args!("peer-to-peer node id {id}"));
        }
        if let Some(quic) = client
            .quic()
            .filter(|_| target.endpoint.transport == Transport::Quic)
        {
            self.debug(format_args!(
                "QUIC 0-RTT: {}",
                match quic.zero_rtt() {
                    ZeroRtt::Accepted => "accepted (CONNECT went in the first flight)",
                    ZeroRtt::Rejected => "rejected (CONNECT sent again after the handshake)",
                    ZeroRtt::Pending => "pending",
                    _ => "not attempted (no session ticket)",
                }
            ));
        }
        Ok((client, events, ack))
    }
}

fn transport_failure(error: TransportError) -> Failure {
    let status = match &error {
        TransportError::Tls(_) => Status::Tls,
        TransportError::TlsConfig(_)
        | TransportError::P2pConfig(_)
        | TransportError::Unsupported { .. } => Status::Usage,
        TransportError::Refused(_) => Status::Refused,
        _ => Status::Unreachable,
    };
    let hint = match &error {
        TransportError::Tls(TlsError::Certificate { check, .. }) => match check {
            mqttd_client::transport::CertCheck::UnknownIssuer => {
                " (is --cafile or --capath the CA that signed the broker's certificate?)"
            }
            mqttd_client::transport::CertCheck::NameMismatch => {
                " (connect with the name in the certificate; --insecure skips this check)"
            }
            _ => "",
        },
        _ => "",
    };
    fail(status, anyhow!("{error}{hint}"))
}

fn connect_failure(error: ConnectError, target: &Target) -> Failure {
    match error {
        ConnectError::Transport(e) => transport_failure(e),
        ConnectError::Io(e) => fail(
            Status::Unreachable,
            anyhow!("cannot connect to {}: {e}", target.endpoint),
        ),
        ConnectError::Refused(ack) => {
            let hint = match ack.reason {
                ReasonCode::BadUserNameOrPassword => ": check -u and -P",
                ReasonCode::NotAuthorized => ": this client may not connect",
                ReasonCode::ClientIdentifierNotValid => ": choose another -i",
                _ => "",
            };
            fail(
                Status::Refused,
                anyhow!("the broker refused the connection: {}{hint}", ack.reason),
            )
        }
        ConnectError::Auth(e) => fail(Status::Refused, e),
        ConnectError::Lost(e) => match TlsError::from_io_error(&e) {
            Some(tls) => transport_failure(TransportError::Tls(tls)),
            None => fail(
                Status::Unreachable,
                anyhow!(
                    "{}: the connection failed before CONNACK: {e}",
                    target.endpoint
                ),
            ),
        },
        ConnectError::Closed(reason) => fail(
            Status::Unreachable,
            anyhow!(
                "{} closed the connection before CONNACK ({reason})",
                target.endpoint
            ),
        ),
        other => fail(Status::Failed, other),
    }
}

/// Publishes messages (like mosquitto_pub).
#[derive(Debug, Args)]
pub(crate) struct PubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to publish to.
    #[arg(short, long)]
    topic: Option<String>,
    /// Payload.
    #[arg(short, long, group = "source")]
    message: Option<String>,
    /// Send the contents of a file as the payload.
    #[arg(short, long, value_name = "FILE", group = "source")]
    file: Option<PathBuf>,
    /// Send each line of standard input as a message (blank lines are skipped).
    #[arg(short = 'l', long = "stdin-line", group = "source")]
    stdin_line: bool,
    /// Send all of standard input as one message (the default when no payload is given).
    #[arg(short = 's', long = "stdin-file", group = "source")]
    stdin_file: bool,
    /// Send an empty message.
    #[arg(short = 'n', long = "null-message", group = "source")]
    null_message: bool,
    /// QoS.
    #[arg(short, long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Retain the message.
    #[arg(short, long)]
    retain: bool,
    /// Publish the message this many times.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Seconds between repeats.
    #[arg(long, default_value_t = 0.0, value_name = "SECS")]
    repeat_delay: f64,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// Subscribes and prints messages (like mosquitto_sub).
#[derive(Debug, Args)]
pub(crate) struct SubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic filter; repeatable.
    #[arg(short, long)]
    topic: Vec<String>,
    /// QoS.
    #[arg(short, long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Print the topic before each payload.
    #[arg(short, long)]
    verbose: bool,
    /// Output format (mosquitto_sub's -F): %t topic, %p payload, %q QoS, %r retained, %m (or
    /// %i) packet id, %l length, %x/%X hex payload, %C %D %E %F %P %R %S MQTT 5 properties,
    /// %j JSON, %J JSON with a JSON payload, %I ISO-8601 time, %U Unix time; @X strftime;
    /// \n \t \0 \e escapes.
    #[arg(short = 'F', long, value_name = "FORMAT")]
    format: Option<String>,
    /// Exit after this many messages.
    #[arg(short = 'C', long, value_name = "N")]
    count: Option<u64>,
    /// Exit with status 27 after this many seconds from connecting.
    #[arg(short = 'W', long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Do not print messages whose topic matches this filter; repeatable.
    #[arg(short = 'T', long = "filter-out", value_name = "FILTER")]
    filter_out: Vec<String>,
    /// Do not print retained ("stale") messages.
    #[arg(short = 'R', long = "no-retained")]
    no_retained: bool,
    /// Exit once the broker acknowledged the subscriptions (and the unsubscriptions).
    #[arg(short = 'E', long = "exit-after-sub")]
    exit_after_sub: bool,
    /// Unsubscribe from this filter once subscribed; repeatable, and possible without -t.
    /// With -c it ends a subscription the session kept. A wildcard subscription cannot be
    /// narrowed: only a filter subscribed as written goes.
    #[arg(short = 'U', long = "unsubscribe", value_name = "FILTER")]
    unsubscribe: Vec<String>,
    /// For each retained message received (and not hidden by -T, even if -R hides it),
    /// publish an empty retained message to its topic (QoS 1), which clears it.
    #[arg(long)]
    remove_retained: bool,
    /// Print only retained messages; exit at the first message that is not retained. With
    /// --remove-retained: clear every retained message under the filters, then exit.
    #[arg(long, conflicts_with = "no_retained")]
    retained_only: bool,
    /// Do not print a newline after each message.
    #[arg(short = 'N', long = "no-newline")]
    no_newline: bool,
    /// Ask the broker not to send this client's own publications back (MQTT 5).
    #[arg(long)]
    no_local: bool,
    /// Keep the retained flag on messages forwarded live (MQTT 5).
    #[arg(long)]
    retain_as_published: bool,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// Where `pub` takes its payloads.
enum Source {
    Once(Bytes),
    Lines,
}

pub(crate) async fn publish(args: PubArgs) -> Outcome {
    let c = &args.connect;
    let target = c.target()?;
    let props = Properties::parse(&c.property, &["connect", "publish", "will", "disconnect"])?;
    let topic = args
        .topic
        .clone()
        .or_else(|| target.topic.clone())
        .ok_or_else(|| usage("no topic: give -t TOPIC (or a topic in the -L URL)"))?;
    let topic =
        TopicName::try_from(topic.as_str()).map_err(|e| usage(format!("-t {topic:?}: {e}")))?;
    let source = if let Some(m) = &args.message {
        Source::Once(Bytes::from(m.clone()))
    } else if let Some(path) = &args.file {
        let bytes =
            std::fs::read(path).map_err(|e| usage(format!("-f {}: {e}", path.display())))?;
        Source::Once(Bytes::from(bytes))
    } else if args.null_message {
        Source::Once(Bytes::new())
    } else if args.stdin_line {
        Source::Lines
    } else {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| usage(format!("reading standard input: {e}")))?;
        Source::Once(Bytes::from(buf))
    };
    let config = c.config(&target, &props)?;
    let qos = qos(args.qos);
    let (client, mut events, _ack) = c.connect(&target, config).await?;
    let mut sender = Sender {
        client: &client,
        events: &mut events,
        args: &args,
        topic,
        qos,
        props: &props,
        sent: 0,
        confirmed: 0,
    };
    match source {
        Source::Once(payload) => {
            for n in 0..args.repeat {
                if n > 0 && args.repeat_delay > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(args.repeat_delay)).await;
                }
                sender.send(payload.clone()).await?;
            }
        }
        Source::Lines => {
            let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = stdin
                    .read_until(b'\n', &mut line)
                    .await
                    .or_status(Status::Failed)?;
                if n == 0 {
                    break;
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                if !line.is_empty() {
                    sender.send(Bytes::copy_from_slice(&line)).await?;
                }
            }
        }
    }
    sender.finish().await?;
    c.debug("sending DISCONNECT");
    client
        .disconnect(ReasonCode::Success, props.disconnect_expiry)
        .await
        .or_status(Status::Failed)?;
    Ok(())
}

/// Publishes and counts confirmations.
struct Sender<'a> {
    client: &'a Client,
    events: &'a mut Events,
    args: &'a PubArgs,
    topic: TopicName,
    qos: QoS,
    props: &'a Properties,
    sent: u64,
    confirmed: u64,
}

impl Sender<'_> {
    async fn send(&mut self, payload: Bytes) -> Outcome {
        let mut message = Message::new(self.topic.clone(), payload, self.qos, self.args.retain);
        message.properties = self.props.publish.clone();
        message.expires_at = self
            .props
            .publish_expiry
            .map(|secs| Instant::now() + Duration::from_secs(secs.into()));
        self.args.connect.debug(format_args!(
            "sending PUBLISH (q{}, r{}, '{}', ... ({} bytes))",
            self.qos as u8,
            u8::from(self.args.retain),
            self.topic,
            message.payload.len()
        ));
        match self
            .client
            .publish(message)
            .await
            .or_status(Status::Failed)?
        {
            Enqueued::Sent | Enqueued::Queued => {}
            other => return Err(fail(Status::Failed, anyhow!("message not sent: {other:?}"))),
        }
        self.sent += 1;
        // Confirmations taken as they come: the client stops reading while they wait.
        while let Some(event) = self.events.try_recv() {
            self.event(Some(event))?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Outcome {
        if self.qos != QoS::AtMostOnce {
            while self.confirmed < self.sent {
                let event = self.events.recv().await;
                self.event(event)?;
            }
        }
        Ok(())
    }

    fn event(&mut self, event: Option<Event>) -> Outcome {
        match event {
            Some(Event::Delivered { reason, .. }) if reason.is_error() => Err(fail(
                Status::PublishRefused,
                anyhow!("the broker refused the message: {reason}"),
            )),
            Some(Event::Delivered {
                packet_id, reason, ..
            }) => {
                self.args.connect.debug(format_args!(
                    "received acknowledgement (Mid: {}, RC: {reason})",
                    packet_id.get()
                ));
                self.confirmed += 1;
                Ok(())
            }
            Some(Event::Closed { reason, .. }) => Err(fail(
                Status::Failed,
                anyhow!("the connection closed: {reason}"),
            )),
            Some(_) => Ok(()),
            None => Err(fail(Status::Failed, anyhow!("the connection closed"))),
        }
    }
}

pub(crate) async fn subscribe(args: SubArgs) -> Outcome {
    let c = &args.connect;
    let target = c.target()?;
    let props = Properties::parse(&c.property, &["connect", "subscribe", "will", "disconnect"])?;
    let mut topics = args.topic.clone();
    topics.extend(target.topic.clone());
    if topics.is_empty() && args.unsubscribe.is_empty() {
        return Err(usage(
            "no topic: give -t FILTER (or a topic in the -L URL) or -U FILTER",
        ));
    }
    let options = SubscriptionOptions {
        qos: qos(args.qos),
        no_local: args.no_local,
        retain_as_published: args.retain_as_published,
        ..SubscriptionOptions::default()
    };
    let filters = topics
        .iter()
        .map(|t| {
            let filter =
                TopicFilter::try_from(t.as_str()).map_err(|e| usage(format!("-t {t:?}: {e}")))?;
            Ok(Subscription { filter, options })
        })
        .collect::<Outcome<Vec<_>>>()?;
    let unsubscribe = args
        .unsubscribe
        .iter()
        .map(|t| TopicFilter::try_from(t.as_str()).map_err(|e| usage(format!("-U {t:?}: {e}"))))
        .collect::<Outcome<Vec<_>>>()?;
    let hidden = args
        .filter_out
        .iter()
        .map(|t| TopicFilter::try_from(t.as_str()).map_err(|e| usage(format!("-T {t:?}: {e}"))))
        .collect::<Outcome<Vec<_>>>()?;
    let format = args.format.as_deref().map(Format::parse);
    let config = c.config(&target, &props)?;
    let (client, mut events, _ack) = c.connect(&target, config).await?;
    // -W counts from the connection, as in Mosquitto.
    let deadline = args
        .timeout
        .map(|secs| tokio::time::Instant::now() + Duration::from_secs(secs));
    if !filters.is_empty() {
        subscribe_all(c, &client, filters, &props, deadline).await?;
    }
    if !unsubscribe.is_empty() {
        unsubscribe_all(c, &client, unsubscribe, deadline).await?;
    }
    let mut stdout = std::io::stdout().lock();
    let mut received = 0u64;
    let mut line = Vec::new();
    // --remove-retained: empty retained messages sent, and those the broker acknowledged.
    let (mut removals, mut removed) = (0u64, 0u64);
    let finished = if args.exit_after_sub {
        Ok(())
    } else {
        loop {
            if args.count.is_some_and(|n| received >= n) {
                break Ok(());
            }
            let event = tokio::select! {
                event = events.recv() => event,
                _ = tokio::signal::ctrl_c() => break Ok(()),
                () = sleep_until(deadline) => break Err(fail(Status::Timeout, anyhow!("timed out after {}s", args.timeout.unwrap_or(0)))),
            };
            let publish = match event {
                Some(Event::Publish(p)) => p,
                Some(Event::Closed { reason, .. }) => {
                    break Err(fail(
                        Status::Failed,
                        anyhow!("the connection closed: {reason}"),
                    ))
                }
                Some(Event::Delivered { reason, .. }) => {
                    removal_acked(&mut removed, reason);
                    continue;
                }
                Some(_) => continue,
                None => break Err(fail(Status::Failed, anyhow!("the connection closed"))),
            };
            let message = &publish.message;
            c.debug(format_args!(
                "received PUBLISH (q{}, r{}, m{}, '{}', ... ({} bytes))",
                message.qos as u8,
                u8::from(message.retain),
                publish.packet_id.map_or(0, |id| id.get()),
                message.topic,
                message.payload.len()
            ));
            // mosquitto_sub's order: --retained-only ends at a live message, -T hides (and
            // spares from --remove-retained), --remove-retained clears, -R hides.
            if args.retained_only && !message.retain {
                break Ok(());
            }
            if hidden.iter().any(|f| f.matches(&message.topic)) {
                continue;
            }
            if args.remove_retained && message.retain {
                let clear =
                    Message::new(message.topic.clone(), Bytes::new(), QoS::AtLeastOnce, true);
                c.debug(format_args!(
                    "sending PUBLISH (q1, r1, '{}', ... (0 bytes))",
                    message.topic
                ));
                match client.publish(clear).await.or_status(Status::Failed)? {
                    Enqueued::Sent | Enqueued::Queued => removals += 1,
                    other => {
                        break Err(fail(
                            Status::Failed,
                            anyhow!("cannot clear {}: {other:?}", message.topic),
                        ))
                    }
                }
            }
            if args.no_retained && message.retain {
                continue;
            }
            line.clear();
            render(&args, format.as_ref(), &publish, &mut line);
            stdout
                .write_all(&line)
                .and_then(|()| stdout.flush())
                .or_status(Status::Failed)?;
            received += 1;
        }
    };
    // As mosquitto_sub, wait for the broker to take the last removal before leaving.
    let finished = match finished {
        Ok(()) => wait_for_removals(&mut events, removals, removed, deadline).await,
        failed => failed,
    };
    c.debug("sending DISCONNECT");
    // The verdict is already made; a broker that goes away first changes nothing.
    let _ = client
        .disconnect(ReasonCode::Success, props.disconnect_expiry)
        .await;
    finished
}

/// Counts the acknowledgement of an empty retained message sent by --remove-retained.
fn removal_acked(removed: &mut u64, reason: ReasonCode) {
    *removed += 1;
    if reason.is_error() {
        eprintln!("Warning: the broker refused to clear a retained message: {reason}");
    }
}

/// Waits until the broker acknowledged all `removals` (of which `removed` already were).
async fn wait_for_removals(
    events: &mut Events,
    removals: u64,
    mut removed: u64,
    deadline: Option<tokio::time::Instant>,
) -> Outcome {
    while removed < removals {
        match until(deadline, events.recv()).await {
            Some(Some(Event::Delivered { reason, .. })) => removal_acked(&mut removed, reason),
            Some(Some(Event::Closed { .. }) | None) => {
                return Err(fail(
                    Status::Failed,
                    anyhow!("the connection closed before the retained messages were cleared"),
                ))
            }
            Some(Some(_)) => {}
            None => {
                return Err(fail(
                    Status::Timeout,
                    anyhow!("timed out waiting for the retained messages to be cleared"),
                ))
            }
        }
    }
    Ok(())
}

/// Subscribes to `filters` and reports what SUBACK says; fails if it refused them all.
async fn subscribe_all(
    c: &ConnectArgs,
    client: &Client,
    filters: Vec<Subscription>,
    props: &Properties,
    deadline: Option<tokio::time::Instant>,
) -> Outcome {
    for s in &filters {
        c.debug(format_args!(
            "sending SUBSCRIBE (Topic: {}, QoS: {})",
            s.filter, s.options.qos as u8
        ));
    }
    let subscribed = client.subscribe(filters.clone(), props.subscribe.clone());
    let ack = before(deadline, "SUBACK", subscribed).await?;
    c.debug(format_args!("received SUBACK ({})", listed(&ack.reasons)));
    let mut refused = 0;
    for (s, reason) in filters.iter().zip(&ack.reasons) {
        if reason.is_error() {
            refused += 1;
            eprintln!("Warning: subscription to {} refused: {reason}", s.filter);
        }
    }
    if refused == filters.len() {
        let _ = client.disconnect(ReasonCode::Success, None).await;
        return Err(fail(
            Status::SubscribeRefused,
            anyhow!("the broker refused every subscription"),
        ));
    }
    Ok(())
}

/// Unsubscribes from `filters` (mosquitto_sub -U) and waits for UNSUBACK.
async fn unsubscribe_all(
    c: &ConnectArgs,
    client: &Client,
    filters: Vec<TopicFilter>,
    deadline: Option<tokio::time::Instant>,
) -> Outcome {
    for filter in &filters {
        c.debug(format_args!("sending UNSUBSCRIBE (Topic: {filter})"));
    }
    let ack = before(deadline, "UNSUBACK", client.unsubscribe(filters)).await?;
    c.debug(format_args!("received UNSUBACK ({})", listed(&ack.reasons)));
    Ok(())
}

/// The answer to a request, or the -W timeout failure once `deadline` passed.
async fn before<T, E: Into<anyhow::Error>>(
    deadline: Option<tokio::time::Instant>,
    answer: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Outcome<T> {
    match until(deadline, request).await {
        Some(answer) => answer.or_status(Status::Failed),
        None => Err(fail(
            Status::Timeout,
            anyhow!("timed out waiting for {answer}"),
        )),
    }
}

/// Reason codes as `-d` prints them.
fn listed(reasons: &[ReasonCode]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One message as mosquitto_sub prints it: -F, -v, or the payload alone (an empty payload
/// prints nothing then), each followed by a newline unless -N.
fn render(
    args: &SubArgs,
    format: Option<&Format>,
    publish: &mqttd_proto::InboundPublish,
    out: &mut Vec<u8>,
) {
    let message = &publish.message;
    let eol = !args.no_newline;
    if let Some(format) = format {
        let received = Received {
            publish,
            time: chrono::Local::now(),
            expiry: message.remaining_expiry(Instant::now()),
        };
        format.render(&received, out);
    } else if args.verbose {
        if message.payload.is_empty() {
            if eol {
                let _ = write!(out, "{} (null)", message.topic);
            }
        } else {
            let _ = write!(out, "{} ", message.topic);
            out.extend_from_slice(&message.payload);
        }
    } else if message.payload.is_empty() {
        return;
    } else {
        out.extend_from_slice(&message.payload);
    }
    if eol {
        out.push(b'\n');
    }
}

/// `future`, or `None` once `deadline` passed.
async fn until<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    future: F,
) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, future).await.ok(),
        None => Some(future.await),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
