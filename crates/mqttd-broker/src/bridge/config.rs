//! A bridge's settings, `[[bridge]]` in the configuration file, parsed into types at load:
//! topic rules in Mosquitto's syntax become [`TopicRule`]s, URLs [`BridgeUrl`]s, and a
//! mistake is an error naming the bridge and what is wrong with it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use mqttd_client::{ServerUrl, TlsOptions, TlsVersion};
use mqttd_proto::{ClientId, MqttStr, ProtocolVersion, QoS, StringError, TopicFilter, TopicName};
use serde::{Deserialize, Deserializer};

/// Which way a topic rule carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// From the remote broker into this one.
    In,
    /// From this broker to the remote one.
    Out,
    /// Both ways.
    Both,
}

impl Direction {
    /// Whether messages go from this broker to the remote one.
    pub fn outgoing(self) -> bool {
        matches!(self, Self::Out | Self::Both)
    }

    /// Whether messages come from the remote broker into this one.
    pub fn incoming(self) -> bool {
        matches!(self, Self::In | Self::Both)
    }
}

/// Why a topic rule could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// Nothing but blanks.
    #[error("empty rule (expected PATTERN [in|out|both [QOS [LOCAL_PREFIX [REMOTE_PREFIX]]]])")]
    Empty,
    /// More than the five words of Mosquitto's syntax.
    #[error("{0} words; at most 5: PATTERN DIRECTION QOS LOCAL_PREFIX REMOTE_PREFIX")]
    TooManyWords(usize),
    /// The direction is not `in`, `out` or `both`.
    #[error("unknown direction {0:?} (in, out or both)")]
    Direction(String),
    /// The QoS is not 0, 1 or 2.
    #[error("QoS {0:?} is not 0, 1 or 2")]
    QoS(String),
    /// The pattern is no valid topic filter.
    #[error("pattern {pattern:?}: {error}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        error: StringError,
    },
    /// A shared subscription cannot carry a bridge's messages.
    #[error("pattern {0:?}: a shared subscription cannot be bridged")]
    Shared(String),
    /// A prefix is part of every topic the rule maps to, so it cannot hold a wildcard.
    #[error("{side} prefix {prefix:?} contains a wildcard")]
    WildcardInPrefix {
        /// `local` or `remote`.
        side: &'static str,
        /// The prefix.
        prefix: String,
    },
    /// With the empty pattern (`""`) the prefixes are the topics, so neither may be empty.
    #[error("the empty pattern \"\" needs both prefixes: they are the topics on each side")]
    NoTopic,
}

/// One topic rule of a bridge, in Mosquitto's syntax (`topic` in mosquitto.conf(5)):
/// `PATTERN [in|out|both [QOS [LOCAL_PREFIX [REMOTE_PREFIX]]]]`, words separated by blanks,
/// `""` for an empty word.
///
/// The rule subscribes on the side messages come from to the prefix of that side followed by
/// the pattern, and a message that arrives on a topic starting with that prefix is published
/// on the other side with the prefix replaced by the other side's. With the empty pattern the
/// two prefixes are whole topics mapped onto each other. Direction defaults to `out`, QoS to 0,
/// the prefixes to none; the QoS caps that of the messages the rule carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    text: String,
    direction: Direction,
    qos: QoS,
    local_prefix: String,
    remote_prefix: String,
    local_filter: TopicFilter,
    remote_filter: TopicFilter,
}

impl TopicRule {
    /// The rule as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Which way it carries messages.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The highest QoS it carries messages at.
    pub fn qos(&self) -> QoS {
        self.qos
    }

    /// The filter on this broker's side: the local prefix and the pattern.
    pub fn local_filter(&self) -> &TopicFilter {
        &self.local_filter
    }

    /// The filter on the remote side: the remote prefix and the pattern.
    pub fn remote_filter(&self) -> &TopicFilter {
        &self.remote_filter
    }

    /// The remote topic for a local message on `topic`, if the rule carries it out.
    pub fn to_remote(&self, topic: &TopicName) -> Option<TopicName> {
        if !self.direction.outgoing() {
            return None;
        }
        remap(
            topic,
            &self.local_filter,
            &self.local_prefix,
            &self.remote_prefix,
        )
    }

    /// The local topic for a remote message on `topic`, if the rule carries it in.
    pub fn to_local(&self, topic: &TopicName) -> Option<TopicName> {
        if !self.direction.incoming() {
            return None;
        }
        remap(
            topic,
            &self.remote_filter,
            &self.remote_prefix,
            &self.local_prefix,
        )
    }
}

/// `topic` with prefix `from` replaced by `to`, if it matches `filter` and starts with `from`
/// (`a/#` matches `a`, which lacks the prefix `a/`).
fn remap(topic: &TopicName, filter: &TopicFilter, from: &str, to: &str) -> Option<TopicName> {
    if !filter.matches(topic) {
        return None;
    }
    let rest = topic.as_str().strip_prefix(from)?;
    TopicName::try_from(format!("{to}{rest}")).ok()
}

impl FromStr for TopicRule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, RuleError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.len() > 5 {
            return Err(RuleError::TooManyWords(words.len()));
        }
        let word = |i: usize| {
            words
                .get(i)
                .map(|w| if *w == "\"\"" { "" } else { *w })
                .unwrap_or("")
        };
        let Some(first) = words.first() else {
            return Err(RuleError::Empty);
        };
        let pattern = if *first == "\"\"" { "" } else { *first };
        let direction = match words.get(1).copied() {
            None | Some("out") => Direction::Out,
            Some("in") => Direction::In,
            Some("both") => Direction::Both,
            Some(other) => return Err(RuleError::Direction(other.to_owned())),
        };
        let qos = match words.get(2).copied() {
            None => QoS::AtMostOnce,
            Some(q) => q
                .parse()
                .ok()
                .and_then(QoS::from_bits)
                .ok_or_else(|| RuleError::QoS(q.to_owned()))?,
        };
        let (local_prefix, remote_prefix) = (word(3), word(4));
        for (side, prefix) in [("local", local_prefix), ("remote", remote_prefix)] {
            if prefix.contains(['+', '#']) {
                return Err(RuleError::WildcardInPrefix {
                    side,
                    prefix: prefix.to_owned(),
                });
            }
        }
        if pattern.is_empty() && (local_prefix.is_empty() || remote_prefix.is_empty()) {
            return Err(RuleError::NoTopic);
        }
        let filter = |prefix: &str| {
            let text = format!("{prefix}{pattern}");
            let filter =
                TopicFilter::try_from(text.as_str()).map_err(|error| RuleError::Pattern {
                    pattern: text.clone(),
                    error,
                })?;
            if filter.share().is_some() {
                return Err(RuleError::Shared(text));
            }
            Ok(filter)
        };
        Ok(Self {
            text: text.trim().to_owned(),
            direction,
            qos,
            local_filter: filter(local_prefix)?,
            remote_filter: filter(remote_prefix)?,
            local_prefix: local_prefix.to_owned(),
            remote_prefix: remote_prefix.to_owned(),
        })
    }
}

/// The schemes `mqttd-client` connects to itself; any other scheme needs a transport plugged
/// in with [`crate::BrokerBuilder::bridge_transport`].
const CLIENT_SCHEMES: &[&str] = &["mqtt", "tcp", "mqtts", "ssl", "tls", "ws", "wss", "quic"];

/// A remote broker's URL: `mqtt://`, `mqtts://`, `ws://`, `wss://` or `quic://` (with
/// `[user[:password]@]host[:port][/path]` as `mqttd pub` reads it), or a scheme whose
/// transport the embedding program plugs in (see [`crate::BridgeTransport`]).
#[derive(Clone)]
pub struct BridgeUrl {
    text: String,
    /// The URL without its password, for logs and errors.
    shown: String,
    scheme: String,
    client: Option<Box<ServerUrl>>,
}

impl BridgeUrl {
    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The scheme, lower-case.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The URL as `mqttd-client` reads it, for its own schemes.
    pub(crate) fn client(&self) -> Option<&ServerUrl> {
        self.client.as_deref()
    }

    /// The user name and password to connect to this URL with: its own, else `bridge`'s.
    pub(crate) fn credentials(&self, bridge: &Bridge) -> (Option<MqttStr>, Option<bytes::Bytes>) {
        let own = self.client().filter(|u| u.username.is_some());
        match own {
            Some(url) => (
                url.username
                    .as_deref()
                    .and_then(|u| MqttStr::try_from(u).ok()),
                url.password.clone().map(bytes::Bytes::from),
            ),
            None => (
                bridge.username.clone(),
                bridge
                    .password
                    .as_ref()
                    .map(|p| bytes::Bytes::from(p.0.clone())),
            ),
        }
    }
}

impl fmt::Display for BridgeUrl {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for BridgeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BridgeUrl({:?})", self.shown)
    }
}

impl FromStr for BridgeUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or("expected SCHEME://HOST[:PORT]")?;
        let scheme = scheme.to_ascii_lowercase();
        let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !valid {
            return Err(format!("invalid scheme {scheme:?}"));
        }
        let client = if CLIENT_SCHEMES.contains(&scheme.as_str()) {
            let url: ServerUrl = text
                .parse()
                .map_err(|e: mqttd_client::transport::UrlError| e.to_string())?;
            Some(Box::new(url))
        } else {
            None
        };
        // user:password@ before the host: the password is not shown.
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let shown = match rest[..authority_end].rfind('@') {
            Some(at) => {
                let user = rest[..at].split(':').next().unwrap_or("");
                format!("{scheme}://{user}@{}", &rest[at + 1..])
            }
            None => format!("{scheme}://{rest}"),
        };
        Ok(Self {
            text: text.to_owned(),
            shown,
            scheme,
            client,
        })
    }
}

/// A password, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Why a `[[bridge]]` table could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeConfigError {
    /// A topic rule could not be read.
    #[error("bridge {bridge:?}: topic rule {rule:?}: {error}")]
    Rule {
        /// The bridge.
        bridge: String,
        /// The rule as written.
        rule: String,
        /// Why.
        error: RuleError,
    },
    /// A URL could not be read.
    #[error("bridge {bridge:?}: URL {url:?}: {reason}")]
    Url {
        /// The bridge.
        bridge: String,
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Another setting is wrong.
    #[error("bridge {bridge:?}: {reason}")]
    Invalid {
        /// The bridge.
        bridge: String,
        /// Why.
        reason: String,
    },
    /// Two bridges have the same name.
    #[error("two bridges are named {0:?}")]
    Duplicate(String),
}

/// A bridge to a remote broker: the `[[bridge]]` tables of the configuration file. The
/// README documents each key; Mosquitto's names are accepted for those that have one.
///
/// The bridge is a persistent session inside this broker (client identifier `$bridge/NAME`,
/// which no client may use) subscribed to the local filters of the outgoing rules, which the
/// broker keeps in its store like any persistent session's; a task connects to the remote
/// broker, forwards what the session receives, and acknowledges it locally only once the
/// remote broker has.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawBridge")]
#[non_exhaustive]
pub struct Bridge {
    /// The bridge's name, in logs, metrics and the local session's client identifier.
    pub name: String,
    /// The remote broker's URLs, tried in order until one connects.
    pub urls: Vec<BridgeUrl>,
    /// What goes which way.
    pub topics: Vec<TopicRule>,
    /// The client identifier on the remote broker.
    pub client_id: ClientId,
    /// The user name on the remote broker (a URL's own `user@` wins for that URL).
    pub username: Option<MqttStr>,
    /// The password on the remote broker (a URL's own `user:password@` wins for that URL).
    pub password: Option<Password>,
    /// MQTT 5 or 3.1.1 towards the remote broker.
    pub protocol: ProtocolVersion,
    /// Start a new session on the remote broker at each connection.
    pub clean_start: bool,
    /// The session expiry interval asked of the remote broker, in seconds (MQTT 5).
    pub session_expiry: u32,
    /// Keep alive towards the remote broker, in seconds.
    pub keep_alive: u16,
    /// With MQTT 3.1.1: announce a bridge as Mosquitto does (protocol level 0x84), so that
    /// the remote broker sends none of the bridge's own messages back.
    pub try_private: bool,
    /// TLS settings for `mqtts://`, `wss://` and `quic://` (and a TLS file with `mqtt://` or
    /// `ws://` turns TLS on, as in Mosquitto).
    pub tls: TlsOptions,
    /// The first wait before connecting again; it doubles at each failure.
    pub reconnect_min: Duration,
    /// The longest wait before connecting again.
    pub reconnect_max: Duration,
    /// How long one connection attempt (transport and CONNACK) may take.
    pub connect_timeout: Duration,
    /// QoS 1 and 2 messages the bridge takes from the local session at once, not yet
    /// acknowledged by the remote broker.
    pub max_inflight: u16,
    /// A hash of the table as written, which tells a reload whether the bridge changed.
    fingerprint: u64,
}

impl Bridge {
    /// A bridge named `name` to `urls` with topic rules `topics` and every other setting at
    /// its default, for programs that build their configuration in code.
    pub fn new(name: &str, urls: &[&str], topics: &[&str]) -> Result<Self, BridgeConfigError> {
        Self::try_from(RawBridge {
            name: name.to_owned(),
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            ..RawBridge::default()
        })
    }

    /// The client identifier of the bridge's session in this broker.
    pub fn local_client_id(&self) -> ClientId {
        local_client_id(&self.name)
    }

    /// Equal for two bridges written the same way (same keys and values).
    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// The prefix of the client identifiers of bridges' sessions: no client may connect with one.
pub(crate) const LOCAL_CLIENT_PREFIX: &str = "$bridge/";

/// The client identifier of the session of the bridge named `name`.
pub(crate) fn local_client_id(name: &str) -> ClientId {
    ClientId::try_from(format!("{LOCAL_CLIENT_PREFIX}{name}")).unwrap_or_default()
}

/// The `[[bridge]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBridge {
    name: String,
    url: Option<String>,
    #[serde(default)]
    urls: Vec<String>,
    #[serde(default, alias = "topic")]
    topics: Vec<String>,
    #[serde(alias = "remote_clientid")]
    client_id: Option<String>,
    #[serde(alias = "remote_username")]
    username: Option<String>,
    #[serde(alias = "remote_password")]
    password: Option<String>,
    #[serde(alias = "bridge_protocol_version")]
    protocol_version: Option<String>,
    #[serde(alias = "cleansession")]
    clean_start: Option<bool>,
    session_expiry: Option<u32>,
    #[serde(alias = "keepalive_interval")]
    keep_alive: Option<u16>,
    try_private: Option<bool>,
    #[serde(alias = "bridge_cafile")]
    cafile: Option<PathBuf>,
    #[serde(alias = "bridge_capath")]
    capath: Option<PathBuf>,
    #[serde(alias = "bridge_certfile")]
    certfile: Option<PathBuf>,
    #[serde(alias = "bridge_keyfile")]
    keyfile: Option<PathBuf>,
    #[serde(alias = "bridge_insecure")]
    insecure: Option<bool>,
    #[serde(alias = "bridge_tls_version")]
    tls_version: Option<String>,
    reconnect_min: Option<f64>,
    reconnect_max: Option<f64>,
    connect_timeout: Option<f64>,
    max_inflight: Option<u16>,
}

/// The session expiry asked of the remote broker unless set: an hour, so that a short outage
/// loses nothing the remote broker queued, and a bridge removed for good is forgotten.
const DEFAULT_SESSION_EXPIRY: u32 = 3600;

/// A name for this machine, for the default remote client identifier (`HOST.NAME`, as
/// Mosquitto's).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "mqttd".to_owned())
}

/// Seconds as a duration; an error unless finite and not negative.
fn seconds(value: Option<f64>, default: f64, key: &str) -> Result<Duration, String> {
    let secs = value.unwrap_or(default);
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{key} = {secs}: not a number of seconds"))
}

impl TryFrom<RawBridge> for Bridge {
    type Error = BridgeConfigError;

    fn try_from(raw: RawBridge) -> Result<Self, BridgeConfigError> {
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            // Passwords included: a new one is a change. The hash is never shown.
            let mut hasher = std::hash::DefaultHasher::new();
            format!("{raw:?}").hash(&mut hasher);
            hasher.finish()
        };
        let name = raw.name;
        let invalid = |reason: String| BridgeConfigError::Invalid {
            bridge: name.clone(),
            reason,
        };
        if name.is_empty() || name.contains(['+', '#', '/']) {
            return Err(invalid(
                "the name must be non-empty, without '/', '+' or '#'".into(),
            ));
        }
        let written: Vec<String> = raw.url.into_iter().chain(raw.urls).collect();
        if written.is_empty() {
            return Err(invalid(
                "no URL (url = \"mqtt://HOST:PORT\" or urls = [...])".into(),
            ));
        }
        let mut urls = Vec::with_capacity(written.len());
        for url in written {
            match url.parse::<BridgeUrl>() {
                Ok(parsed) => urls.push(parsed),
                Err(reason) => {
                    return Err(BridgeConfigError::Url {
                        bridge: name.clone(),
                        url,
                        reason,
                    })
                }
            }
        }
        if raw.topics.is_empty() {
            return Err(invalid(
                "no topics (topics = [\"PATTERN in|out|both QOS LOCAL_PREFIX REMOTE_PREFIX\"])"
                    .into(),
            ));
        }
        let mut topics = Vec::with_capacity(raw.topics.len());
        for rule in raw.topics {
            match rule.parse::<TopicRule>() {
                Ok(parsed) => topics.push(parsed),
                Err(error) => {
                    return Err(BridgeConfigError::Rule {
                        bridge: name.clone(),
                        rule,
                        error,
                    })
                }
            }
        }
        let protocol = match raw.protocol_version.as_deref() {
            None | Some("5" | "5.0" | "mqttv5" | "mqttv50") => ProtocolVersion::V5,
            Some("3.1.1" | "311" | "mqttv311") => ProtocolVersion::V3_1_1,
            Some(other) => {
                return Err(invalid(format!(
                    "protocol_version {other:?}: expected \"5\" or \"3.1.1\" (mqttv50, mqttv311)"
                )))
            }
        };
        let username = raw
            .username
            .map(|u| MqttStr::try_from(u).map_err(|e| invalid(format!("username: {e}"))))
            .transpose()?;
        let client_id = raw
            .client_id
            .unwrap_or_else(|| format!("{}.{name}", hostname()));
        let client_id =
            ClientId::try_from(client_id).map_err(|e| invalid(format!("client_id: {e}")))?;
        let mut tls = TlsOptions::default();
        tls.ca_file = raw.cafile;
        tls.ca_path = raw.capath;
        tls.cert_file = raw.certfile;
        tls.key_file = raw.keyfile;
        tls.insecure = raw.insecure.unwrap_or(false);
        tls.version = raw
            .tls_version
            .map(|v| {
                v.parse::<TlsVersion>()
                    .map_err(|e| invalid(format!("tls_version: {e}")))
            })
            .transpose()?;
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(invalid("certfile and keyfile go together".into()));
        }
        let reconnect_min = seconds(raw.reconnect_min, 1.0, "reconnect_min").map_err(invalid)?;
        let reconnect_max = seconds(raw.reconnect_max, 30.0, "reconnect_max").map_err(invalid)?;
        if reconnect_max < reconnect_min {
            return Err(invalid("reconnect_max is below reconnect_min".into()));
        }
        let connect_timeout =
            seconds(raw.connect_timeout, 10.0, "connect_timeout").map_err(invalid)?;
        Ok(Self {
            urls,
            topics,
            client_id,
            username,
            password: raw.password.map(Password),
            protocol,
            clean_start: raw.clean_start.unwrap_or(false),
            session_expiry: raw.session_expiry.unwrap_or(DEFAULT_SESSION_EXPIRY),
            keep_alive: raw.keep_alive.unwrap_or(60),
            try_private: raw.try_private.unwrap_or(true),
            tls,
            reconnect_min: reconnect_min.max(Duration::from_millis(10)),
            reconnect_max: reconnect_max.max(Duration::from_millis(10)),
            connect_timeout: connect_timeout.max(Duration::from_millis(100)),
            max_inflight: raw.max_inflight.unwrap_or(64).max(1),
            fingerprint,
            name,
        })
    }
}

/// Reads the `[[bridge]]` tables, refusing two with one name (they would share a session).
pub(crate) fn unique_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Bridge>, D::Error> {
    let bridges = Vec::<Bridge>::deserialize(d)?;
    for (i, b) in bridges.iter().enumerate() {
        if bridges[..i].iter().any(|other| other.name == b.name) {
            return Err(serde::de::Error::custom(BridgeConfigError::Duplicate(
                b.name.clone(),
            )));
        }
    }
    Ok(bridges)
}

/// The bridges as the admin API shows them: every setting, the password never (`"***"` when
/// one is set; URLs are shown without theirs).
pub(crate) fn serialize_redacted<S: serde::Serializer>(
    bridges: &[Bridge],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(bridges.len()))?;
    for b in bridges {
        let tls = &b.tls;
        seq.serialize_element(&serde_json::json!({
            "name": b.name,
            "urls": b.urls.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "topics": b.topics.iter().map(TopicRule::as_str).collect::<Vec<_>>(),
            "client_id": b.client_id.as_str(),
            "username": b.username.as_ref().map(ToString::to_string),
            "password": b.password.as_ref().map(|_| "***"),
            "protocol": b.protocol.to_string(),
            "clean_start": b.clean_start,
            "session_expiry": b.session_expiry,
            "keep_alive": b.keep_alive,
            "try_private": b.try_private,
            "tls": {
                "ca_file": tls.ca_file,
                "ca_path": tls.ca_path,
                "cert_file": tls.cert_file,
                "key_file": tls.key_file,
                "insecure": tls.insecure,
            },
            "reconnect_min": b.reconnect_min.as_secs_f64(),
            "reconnect_max": b.reconnect_max.as_secs_f64(),
            "connect_timeout": b.connect_timeout.as_secs_f64(),
            "max_inflight": b.max_inflight,
        }))?;
    }
    seq.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> TopicRule {
        text.parse().unwrap()
    }

    fn topic(s: &str) -> TopicName {
        TopicName::try_from(s).unwrap()
    }

    #[test]
    fn rules_default_to_out_at_qos_0_without_prefixes() {
        let r = rule("sensors/#");
        assert_eq!(r.direction(), Direction::Out);
        assert_eq!(r.qos(), QoS::AtMostOnce);
        assert_eq!(r.local_filter().as_str(), "sensors/#");
        assert_eq!(r.remote_filter().as_str(), "sensors/#");
        assert_eq!(r.to_remote(&topic("sensors/a")), Some(topic("sensors/a")));
        assert_eq!(r.to_local(&topic("sensors/a")), None, "out only");
    }

    #[test]
    fn prefixes_are_replaced_both_ways() {
        let r = rule("sensors/# both 1 local/ remote/");
        assert_eq!(r.qos(), QoS::AtLeastOnce);
        assert_eq!(r.local_filter().as_str(), "local/sensors/#");
        assert_eq!(r.remote_filter().as_str(), "remote/sensors/#");
        assert_eq!(
            r.to_remote(&topic("local/sensors/t1")),
            Some(topic("remote/sensors/t1"))
        );
        assert_eq!(
            r.to_local(&topic("remote/sensors/t1")),
            Some(topic("local/sensors/t1"))
        );
        assert_eq!(r.to_remote(&topic("other/sensors/t1")), None);
        // `local/sensors/#` matches `local/sensors` too, which maps like any other.
        assert_eq!(
            r.to_remote(&topic("local/sensors")),
            Some(topic("remote/sensors"))
        );
    }

    #[test]
    fn an_empty_word_is_written_as_two_quotes() {
        let r = rule("cmd/# in 2 \"\" edge/1/");
        assert_eq!(r.direction(), Direction::In);
        assert_eq!(r.qos(), QoS::ExactlyOnce);
        assert_eq!(r.local_filter().as_str(), "cmd/#");
        assert_eq!(r.remote_filter().as_str(), "edge/1/cmd/#");
        assert_eq!(r.to_local(&topic("edge/1/cmd/x")), Some(topic("cmd/x")));
        // The empty pattern maps one whole topic onto another.
        let r = rule("\"\" out 1 local/status remote/edge-1/status");
        assert_eq!(r.local_filter().as_str(), "local/status");
        assert_eq!(
            r.to_remote(&topic("local/status")),
            Some(topic("remote/edge-1/status"))
        );
        assert_eq!(r.to_remote(&topic("local/status/x")), None);
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("", RuleError::Empty),
            ("a out 1 x/ y/ z", RuleError::TooManyWords(6)),
            ("a sideways", RuleError::Direction("sideways".into())),
            ("a in 3", RuleError::QoS("3".into())),
            ("a in one", RuleError::QoS("one".into())),
            (
                "a/#/b",
                RuleError::Pattern {
                    pattern: "a/#/b".into(),
                    error: StringError::MisplacedWildcard,
                },
            ),
            ("$share/g/a", RuleError::Shared("$share/g/a".into())),
            (
                "a out 0 x/+/ y/",
                RuleError::WildcardInPrefix {
                    side: "local",
                    prefix: "x/+/".into(),
                },
            ),
            ("\"\" out 0 x", RuleError::NoTopic),
        ];
        for (text, error) in cases {
            assert_eq!(text.parse::<TopicRule>(), Err(error), "{text:?}");
        }
    }

    fn bridge(toml_text: &str) -> Result<Bridge, String> {
        #[derive(Debug, Deserialize)]
        struct Wrapper {
            #[serde(deserialize_with = "unique_names")]
            bridge: Vec<Bridge>,
        }
        toml::from_str::<Wrapper>(toml_text)
            .map(|w| w.bridge.into_iter().next().unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_bridge_table_with_defaults() {
        let b = bridge(
            "[[bridge]]\nname = \"cloud\"\nurls = [\"quic://a:14567\", \"mqtts://u:pw@a:8883\"]\n\
             topics = [\"sensors/# out 1 local/ remote/\", \"cmd/# in 1\"]\n",
        )
        .unwrap();
        assert_eq!(b.name, "cloud");
        assert_eq!(b.urls.len(), 2);
        assert_eq!(b.urls[0].scheme(), "quic");
        assert_eq!(b.urls[1].to_string(), "mqtts://u@a:8883");
        assert_eq!(b.topics.len(), 2);
        assert_eq!(b.protocol, ProtocolVersion::V5);
        assert!(!b.clean_start && b.try_private);
        assert_eq!((b.session_expiry, b.keep_alive), (3600, 60));
        assert!(b.client_id.as_str().ends_with(".cloud"));
        assert_eq!(b.local_client_id().as_str(), "$bridge/cloud");
        assert_eq!(b.reconnect_min, Duration::from_secs(1));
        assert_eq!(b.max_inflight, 64);
        assert!(!format!("{b:?}").contains("pw"), "{b:?}");
        assert_eq!(b.urls[0].credentials(&b), (None, None));
    }

    #[test]
    fn mosquitto_names_are_accepted() {
        let b = bridge(
            "[[bridge]]\nname = \"m\"\naddress = \"mqtt://u:pw@h:1883\"\n\
             topic = [\"# both 2\"]\nremote_clientid = \"edge\"\ncleansession = true\n\
             bridge_protocol_version = \"mqttv311\"\ntry_private = false\n\
             keepalive_interval = 5\nbridge_cafile = \"/ca.pem\"\nbridge_insecure = true\n",
        );
        // `address` is Mosquitto's, but the key here is `url`.
        assert!(b.unwrap_err().contains("unknown field `address`"));
        let b = bridge(
            "[[bridge]]\nname = \"m\"\nurl = \"mqtt://u:pw@h:1883\"\n\
             topic = [\"# both 2\"]\nremote_clientid = \"edge\"\ncleansession = true\n\
             bridge_protocol_version = \"mqttv311\"\ntry_private = false\n\
             keepalive_interval = 5\nbridge_cafile = \"/ca.pem\"\nbridge_insecure = true\n",
        )
        .unwrap();
        assert_eq!(b.client_id.as_str(), "edge");
        assert!(b.clean_start && !b.try_private);
        assert_eq!(b.protocol, ProtocolVersion::V3_1_1);
        assert_eq!(b.keep_alive, 5);
        assert_eq!(
            b.tls.ca_file.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert!(b.tls.insecure);
        // The URL's credentials are the URL's (see `BridgeUrl::credentials`).
        assert_eq!(b.username, None);
        let (user, password) = b.urls[0].credentials(&b);
        assert_eq!(user.as_ref().map(|u| u.as_str()), Some("u"));
        assert_eq!(password.as_deref(), Some(&b"pw"[..]));
    }

    #[test]
    fn errors_name_the_bridge_and_the_rule() {
        let e = bridge(
            "[[bridge]]\nname = \"cloud\"\nurl = \"mqtt://h\"\ntopics = [\"a/# sideways 1\"]\n",
        )
        .unwrap_err();
        assert!(
            e.contains("bridge \"cloud\": topic rule \"a/# sideways 1\": unknown direction"),
            "{e}"
        );
        let e = bridge("[[bridge]]\nname = \"cloud\"\nurl = \"h:1883\"\ntopics = [\"a\"]\n")
            .unwrap_err();
        assert!(e.contains("bridge \"cloud\": URL \"h:1883\""), "{e}");
        let e = bridge("[[bridge]]\nname = \"cloud\"\nurl = \"mqtt://h\"\n").unwrap_err();
        assert!(e.contains("bridge \"cloud\": no topics"), "{e}");
        let e = bridge("[[bridge]]\nname = \"c\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nprotocol_version = \"4\"\n")
            .unwrap_err();
        assert!(e.contains("protocol_version \"4\""), "{e}");
        let two = "[[bridge]]\nname = \"c\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\n";
        let e = bridge(&format!("{two}{two}")).unwrap_err();
        assert!(e.contains("two bridges are named \"c\""), "{e}");
    }

    #[test]
    fn other_schemes_wait_for_a_plugged_transport() {
        let u: BridgeUrl = "p2p://node-id-abc".parse().unwrap();
        assert_eq!(u.scheme(), "p2p");
        assert!(u.client().is_none());
        let u: BridgeUrl = "MQTT://h:1".parse().unwrap();
        assert!(u.client().is_some());
        assert!("://h".parse::<BridgeUrl>().is_err());
        assert!("1ab://h".parse::<BridgeUrl>().is_err());
    }

    #[test]
    fn a_bridge_written_the_same_way_has_the_same_fingerprint() {
        let read = |extra: &str| {
            let text = format!(
                "[[bridge]]\nname = \"b\"\nurls = [\"mqtt://h:1\"]\ntopics = [\"a/#\"]\n{extra}"
            );
            bridge(&text).unwrap()
        };
        assert_eq!(read("").fingerprint(), read("").fingerprint());
        let base = read("password = \"one\"").fingerprint();
        assert_ne!(base, read("password = \"two\"").fingerprint());
        assert_ne!(base, read("").fingerprint());
        assert_ne!(
            read("").fingerprint(),
            read("max_inflight = 3").fingerprint()
        );
    }
}
