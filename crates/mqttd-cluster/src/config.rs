//! The `[cluster]` section of the configuration.
//!
//! ```toml
//! [cluster]
//! node_id = 1
//! name = "node-a"                 # the DNS name in this node's certificate
//! listen = "0.0.0.0:1884"         # UDP: QUIC, ALPN mqttd-cluster/1
//! advertise = "10.0.0.1:1884"     # what peers dial (default: listen)
//! seeds = [
//!   { id = 2, name = "node-b", addr = "10.0.0.2:1884" },
//!   { id = 3, name = "node-c", addr = "10.0.0.3:1884" },
//! ]
//! ca = "/etc/mqttd/cluster-ca.pem"
//! cert = "/etc/mqttd/node-a.pem"
//! key = "/etc/mqttd/node-a.key"
//! # data_dir = "/var/lib/mqttd/cluster"   # default: "cluster" beside the broker's store
//! ```
//!
//! The broker's `Config` holds it as `cluster`; [`ClusterConfig::parse`] reads the section on
//! its own (a whole file whose `[cluster]` table it takes).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::state::NodeId;
use crate::Member;

/// A peer to contact when the node starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Its Raft node id.
    pub id: NodeId,
    /// Its name (the DNS name in its certificate).
    pub name: String,
    /// Its cluster listener, `host:port`.
    pub addr: String,
}

impl Seed {
    /// The seed as a Raft member.
    pub fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            addr: self.addr.clone(),
        }
    }
}

/// The `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// This node's Raft id: unique in the cluster and never reused.
    pub node_id: NodeId,
    /// This node's name: its certificate must carry it as a DNS name.
    pub name: String,
    /// The UDP address of the cluster listener.
    pub listen: SocketAddr,
    /// The address peers dial; default: `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Peers to contact at start.
    #[serde(default)]
    pub seeds: Vec<Seed>,
    /// The cluster CA (PEM): peers must present a certificate it signed.
    pub ca: PathBuf,
    /// This node's certificate chain (PEM), signed by the cluster CA.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
    /// Where the Raft log and snapshots live; default: `cluster` beside the broker's store.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Raft entries between two snapshots of the state; default 5,000.
    #[serde(default)]
    pub snapshot_every: Option<u64>,
    /// Entries kept in the log before the latest snapshot, for followers a little behind;
    /// one further behind gets the snapshot. Default 1,000.
    #[serde(default)]
    pub log_kept: Option<u64>,
    /// Seconds the leader goes without an answer from a node before it takes the node's
    /// connections as lost and orphans its sessions; default 10 (longer than an election).
    #[serde(default)]
    pub node_down_after: Option<u64>,
    /// What a node does while it is cut off from a quorum (a minority side, or no leader):
    /// persistent sessions are refused either way, since nothing can be committed.
    #[serde(default)]
    pub minority: Minority,
}

/// What a node cut off from a quorum does with clients that need no commit (clean sessions,
/// QoS 0, QoS 1 and 2 between clean sessions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Minority {
    /// Serves them, as a broker alone would (the default): they go on through a partition.
    #[default]
    Serve,
    /// Serves nobody: a CONNECT is refused with 0x88 (server unavailable; return code 3 for
    /// MQTT 3.1.1) and connected clients are disconnected (0x9C, use another server, for
    /// MQTT 5), so that they go to the majority side.
    Refuse,
}

/// Why a `[cluster]` section is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Not TOML, or a key missing, unknown or of the wrong type.
    #[error("[cluster]: {0}")]
    Toml(#[from] Box<toml::de::Error>),
    /// The file has no `[cluster]` section.
    #[error("no [cluster] section")]
    Missing,
    /// A rule across keys is broken.
    #[error("[cluster]: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct File {
    cluster: Option<ClusterConfig>,
}

impl ClusterConfig {
    /// Reads the `[cluster]` section of a configuration file's text (other sections are
    /// ignored).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(Box::new)?;
        let config = file.cluster.ok_or(ConfigError::Missing)?;
        config.check()?;
        Ok(config)
    }

    /// Checks the rules across keys.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::Invalid("name is empty".into()));
        }
        if self.snapshot_every == Some(0) {
            return Err(ConfigError::Invalid(
                "snapshot_every must be above 0".into(),
            ));
        }
        if self.node_down_after == Some(0) {
            return Err(ConfigError::Invalid(
                "node_down_after must be above 0".into(),
            ));
        }
        let mut ids = vec![self.node_id];
        for seed in &self.seeds {
            if ids.contains(&seed.id) {
                return Err(ConfigError::Invalid(format!(
                    "node id {} appears twice (node_id and seeds)",
                    seed.id
                )));
            }
            ids.push(seed.id);
            if seed.name.is_empty() || seed.addr.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "seed {} needs a name and an addr",
                    seed.id
                )));
            }
        }
        Ok(())
    }

    /// This node as a Raft member: its name and the address peers dial.
    pub fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            addr: self
                .advertise
                .clone()
                .unwrap_or_else(|| self.listen.to_string()),
        }
    }

    /// The store directory, given the broker's data directory.
    pub fn data_dir(&self, broker_data_dir: &std::path::Path) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| broker_data_dir.join("cluster"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        [broker]
        whatever = 1

        [cluster]
        node_id = 1
        name = "node-a"
        listen = "0.0.0.0:1884"
        advertise = "10.0.0.1:1884"
        seeds = [
          { id = 2, name = "node-b", addr = "10.0.0.2:1884" },
          { id = 3, name = "node-c", addr = "node-c.example:1884" },
        ]
        ca = "/etc/mqttd/ca.pem"
        cert = "/etc/mqttd/a.pem"
        key = "/etc/mqttd/a.key"
        minority = "refuse"
    "#;

    #[test]
    fn a_full_section() {
        let c = ClusterConfig::parse(FULL).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.name, "node-a");
        assert_eq!(c.listen, "0.0.0.0:1884".parse().unwrap());
        assert_eq!(c.seeds.len(), 2);
        assert_eq!(c.seeds[1].member().addr, "node-c.example:1884");
        assert_eq!(c.member().addr, "10.0.0.1:1884");
        assert_eq!(c.ca, PathBuf::from("/etc/mqttd/ca.pem"));
        assert_eq!(c.minority, Minority::Refuse);
        assert_eq!(
            c.data_dir(std::path::Path::new("/var/lib/mqttd")),
            PathBuf::from("/var/lib/mqttd/cluster")
        );
    }

    #[test]
    fn defaults() {
        let c = ClusterConfig::parse(
            r#"[cluster]
            node_id = 7
            name = "solo"
            listen = "127.0.0.1:0"
            ca = "ca.pem"
            cert = "c.pem"
            key = "k.pem"
            data_dir = "/tmp/x""#,
        )
        .unwrap();
        assert!(c.seeds.is_empty());
        assert_eq!((c.snapshot_every, c.log_kept), (None, None));
        assert_eq!(c.node_down_after, None);
        assert_eq!(c.minority, Minority::Serve);
        assert_eq!(c.member().addr, "127.0.0.1:0");
        assert_eq!(
            c.data_dir(std::path::Path::new("/ignored")),
            PathBuf::from("/tmp/x")
        );
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            ClusterConfig::parse("[broker]\nx = 1"),
            Err(ConfigError::Missing)
        ));
        // A key missing, an unknown key, a bad address.
        for bad in [
            FULL.replace("name = \"node-a\"", ""),
            FULL.replace("node_id = 1", "node_id = 1\nfoo = 2"),
            FULL.replace("0.0.0.0:1884", "nowhere"),
            FULL.replace("\"refuse\"", "\"sometimes\""),
        ] {
            assert!(
                matches!(ClusterConfig::parse(&bad), Err(ConfigError::Toml(_))),
                "{bad}"
            );
        }
        let twice = FULL.replace("id = 2", "id = 1");
        assert!(matches!(
            ClusterConfig::parse(&twice),
            Err(ConfigError::Invalid(m)) if m.contains("twice")
        ));
        let never = FULL.replace("node_id = 1", "node_id = 1\nsnapshot_every = 0");
        assert!(matches!(
            ClusterConfig::parse(&never),
            Err(ConfigError::Invalid(m)) if m.contains("snapshot_every")
        ));
        let at_once = FULL.replace("node_id = 1", "node_id = 1\nnode_down_after = 0");
        assert!(matches!(
            ClusterConfig::parse(&at_once),
            Err(ConfigError::Invalid(m)) if m.contains("node_down_after")
        ));
    }
}
