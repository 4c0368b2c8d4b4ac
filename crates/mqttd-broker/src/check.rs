//! `mqttd check-config`: a configuration and the files it names, checked without starting
//! (nothing is bound, nothing is written in the data directory).

use std::path::PathBuf;

use crate::access::AccessControl;
use crate::config::{Config, ListenerKind};

/// A problem [`check`] found, naming the setting or the file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The setting (`listen`, `password_file`, `tls`, `bridge NAME`, `p2p`, ...).
    pub setting: String,
    /// What is wrong, naming the file if it is one.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

/// Every problem of `config` and of the files it names: the listeners, the password and ACL
/// files, the certificates, keys and CA files (of the listeners, of the bridges and of
/// `[cluster]`), and the `[p2p]` and `[cluster]` settings. Empty: the broker would start with it (unless a port is taken, or the
/// data directory is not writable).
pub fn check(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |setting: &str, message: String| {
        problems.push(Problem {
            setting: setting.to_owned(),
            message,
        })
    };
    let mut listeners = Vec::new();
    for url in &config.listen {
        match crate::config::Listener::parse(url) {
            Ok(listener) => listeners.push(listener),
            Err(error) => problem("listen", error.to_string()),
        }
    }
    if listeners
        .iter()
        .filter(|l| l.kind == ListenerKind::P2p)
        .count()
        > 1
    {
        problem(
            "listen",
            "one p2p:// listener at most: the broker has one node identity".into(),
        );
    }
    // Each file on its own, so that both are reported.
    if config.password_file.is_some() {
        let mut only = config.clone();
        only.acl_file = None;
        if let Err(error) = AccessControl::load(&only) {
            problem("password_file", error.to_string());
        }
    }
    if config.acl_file.is_some() {
        let mut only = config.clone();
        only.password_file = None;
        if let Err(error) = AccessControl::load(&only) {
            problem("acl_file", error.to_string());
        }
    }
    if listeners.iter().any(|l| l.kind.uses_tls()) {
        if let Err(error) = check_tls(config) {
            problem("tls", error.to_string());
        }
    }
    let mut names = std::collections::HashSet::new();
    for bridge in &config.bridge {
        let setting = format!("bridge {:?}", bridge.name);
        if !names.insert(&bridge.name) {
            problem(&setting, "two bridges have this name".into());
        }
        if let Err(error) = crate::bridge::check(bridge) {
            problem(&setting, error);
        }
    }
    if let Some(cluster) = &config.cluster {
        if let Err(error) = crate::cluster::check(cluster, &config.data_dir) {
            problem("cluster", error);
        }
    }
    #[cfg(feature = "p2p")]
    {
        if let Err(error) = crate::listener::p2p::allowed(&config.p2p) {
            problem("p2p", error.to_string());
        }
        if let Err(error) = crate::bridge::p2p::P2pBridges::new(config, Default::default()) {
            problem("p2p", error.to_string());
        }
    }
    problems
}

/// Loads the certificates of the TLS-based listeners. Without `cert_file` the broker
/// generates a local CA and certificate on its first start: they are generated in a scratch
/// directory here, so that the other files (SNI, CA) are still checked.
fn check_tls(config: &Config) -> Result<(), crate::TlsError> {
    let generated = config.tls.cert_file.is_none() && config.tls.key_file.is_none();
    let scratch: Option<PathBuf> = generated
        .then(|| std::env::temp_dir().join(format!("mqttd-check-config-{}", std::process::id())));
    let data_dir = scratch.as_deref().unwrap_or(&config.data_dir);
    let loaded = crate::tls::TlsAcceptor::load(&config.tls, data_dir).map(drop);
    if let Some(scratch) = &scratch {
        let _ = std::fs::remove_dir_all(scratch);
    }
    loaded
}
