//! What the cluster crate's integration tests share: a cluster CA for node certificates,
//! node options on loopback, and polling with one generous bound.

#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mqttd_cluster::network::Tls;
use mqttd_cluster::{Command, NodeId, NodeOptions};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

/// Generous: the CI machine has 2 busy cores and elections take 1.5-3 s of silence.
pub(crate) const PATIENCE: Duration = Duration::from_secs(60);

pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub(crate) pem: String,
}

impl Ca {
    pub(crate) fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `name`: (cert PEM, key PEM).
    pub(crate) fn leaf(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName(name.try_into().unwrap())];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA and `name`'s certificate and key into `dir`, as an operator would.
    pub(crate) fn files(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.leaf(name);
        let paths = (
            dir.join("ca.pem"),
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&paths.0, &self.pem).unwrap();
        std::fs::write(&paths.1, cert).unwrap();
        std::fs::write(&paths.2, key).unwrap();
        paths
    }
}

pub(crate) fn name(id: NodeId) -> String {
    format!("node-{id}")
}

pub(crate) fn options(ca: &Ca, dir: &Path, id: NodeId, listen: SocketAddr) -> NodeOptions {
    let (ca, cert, key) = ca.files(dir, &name(id));
    let tls = Tls::load(&ca, &cert, &key).unwrap();
    NodeOptions::new(id, &name(id), listen, dir.join(name(id)), tls)
}

/// Polls `check` until it holds; panics naming `what` after [`PATIENCE`]. Prints how long it
/// took (`--nocapture`).
pub(crate) async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{what}: {:.2} s", start.elapsed().as_secs_f64());
}

/// Retries an async step until it succeeds; panics naming `what` after [`PATIENCE`].
pub(crate) async fn retry<T, E: std::fmt::Debug, F: Future<Output = Result<T, E>>>(
    what: &str,
    mut step: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    let mut failures = 0;
    loop {
        match step().await {
            Ok(v) => return v,
            Err(e) => {
                assert!(start.elapsed() < PATIENCE, "{what}: {e:?}");
                failures += 1;
                if failures == 1 {
                    eprintln!("{what}: {e:?}, trying again");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// `node` claims the session of `client_id` (not a clean start, no expiry).
pub(crate) fn claim(client_id: &str, node: NodeId) -> Command {
    Command::ClaimSession {
        owner_quiet_ms: 0,
        not_after_ms: 0,
        incarnation: 0,
        client_id: client_id.into(),
        node,
        expires_at_ms: None,
        clean: false,
    }
}
