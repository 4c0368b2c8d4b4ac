//! TLS for the TLS-based listeners (`tls://`; `wss://` runs its WebSocket handshake on the
//! same [`TlsAcceptor`]; `quic://` takes a TLS 1.3 configuration of the same certificates from
//! it, [`TlsAcceptor::quic_server_config`]): the rustls server configuration built from the
//! `[tls]` table, the
//! certificate chosen by SNI, client certificates verified against `tls.ca_file` and the
//! identity they carry, reloading (SIGHUP) without touching the connections that are up, and
//! the local CA generated when no certificate is configured ([`generate`]).
//!
//! One crypto provider serves the whole broker: *ring*, with TLS 1.3 and 1.2.
//!
//! Connections run on [`TlsStream`]: rustls' unbuffered API with buffers the stream releases
//! when the connection goes quiet, so that an idle TLS connection holds rustls' state and keys
//! and no buffers (see `stream.rs`).
//!
//! The handshake runs in the connection's own task, under the connection's deadline (see
//! `listener.rs`, `Connection::tls_handshake`): the accept loop never waits for a client.

mod generate;
mod identity;
mod stream;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::warn;

use crate::config::TlsConfig;

#[cfg(feature = "p2p")]
pub(crate) use generate::generated_ca;
pub(crate) use generate::TLS_DIR;
pub(crate) use stream::TlsStream;

/// Why the TLS certificates could not be loaded (at startup, or on reload). Each variant names
/// the file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// What the file is for (`certificate file`, `key file`, ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file is not the PEM it should be, or holds none of what it should.
    #[error("{what} {}: {reason}", path.display())]
    Pem {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The private key is unusable, or does not belong to the certificate.
    #[error("key file {} does not fit certificate file {}: {reason}", key.display(), cert.display())]
    Key {
        /// The certificate chain.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA certificates for client certificates are unusable.
    #[error("client CA file {}: {reason}", path.display())]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The `[tls]` settings contradict each other.
    #[error("[tls] settings: {0}")]
    Settings(&'static str),
    /// The local CA or the server certificate could not be generated.
    #[error("cannot generate {}: {reason}", path.display())]
    Generate {
        /// The file that could not be made.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A TLS connection that completed its handshake.
#[derive(Debug)]
pub(crate) struct Accepted<S> {
    /// The encrypted stream, ready for MQTT (or for a WebSocket upgrade).
    pub(crate) stream: TlsStream<S>,
    /// The identity in the client's certificate, verified against `tls.ca_file` (see
    /// [`crate::hooks::Peer::tls_identity`]).
    pub(crate) identity: Option<Arc<str>>,
}

/// The server side of TLS, shared by every TLS-based listener; cheap to clone.
///
/// It holds the rustls configuration behind an atomic pointer: [`TlsAcceptor::reload`] swaps
/// in one built from the files as they are now, which new handshakes use; connections that
/// are up keep the one they started with.
#[derive(Clone)]
pub(crate) struct TlsAcceptor(Arc<Shared>);

/// Certificates read for a reload, not in use yet (see [`TlsAcceptor::install`]).
pub(crate) struct PreparedTls(ServerConfig);

struct Shared {
    config: ArcSwap<ServerConfig>,
    sources: Sources,
    provider: Arc<CryptoProvider>,
    /// Counts successful reloads, so that listeners holding a configuration of their own
    /// (QUIC endpoints) rebuild it.
    reloads: watch::Sender<u64>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("sources", &self.0.sources)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Loads the certificates `tls` names; without `cert_file`, generates (first start) or
    /// reuses the local CA and server certificate under `<data_dir>/tls/`.
    pub(crate) fn load(tls: &TlsConfig, data_dir: &Path) -> Result<Self, TlsError> {
        let sources = Sources::resolve(tls, data_dir)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = sources.server_config(&provider, rustls::DEFAULT_VERSIONS)?;
        Ok(Self(Arc::new(Shared {
            config: ArcSwap::from_pointee(config),
            sources,
            provider,
            reloads: watch::Sender::new(0),
        })))
    }

    /// Reads every certificate, key and CA file again and uses them for new handshakes. On
    /// error nothing changes.
    pub(crate) fn reload(&self) -> Result<(), TlsError> {
        let prepared = self.prepare()?;
        self.install(prepared);
        Ok(())
    }

    /// Reads every certificate, key and CA file again, without using them yet.
    pub(crate) fn prepare(&self) -> Result<PreparedTls, TlsError> {
        self.0
            .sources
            .server_config(&self.0.provider, rustls::DEFAULT_VERSIONS)
            .map(PreparedTls)
    }

    /// Uses what [`Self::prepare`] read for new handshakes.
    pub(crate) fn install(&self, prepared: PreparedTls) {
        self.0.config.store(Arc::new(prepared.0));
        self.0.reloads.send_modify(|n| *n += 1);
    }

    /// Changes after each successful [`Self::reload`]: a QUIC endpoint then builds a new
    /// configuration with [`Self::quic_server_config`].
    pub(crate) fn reloads(&self) -> watch::Receiver<u64> {
        self.0.reloads.subscribe()
    }

    /// A rustls configuration for QUIC from the files as they are now: the same certificates,
    /// SNI and client-certificate rules as the TLS listeners, TLS 1.3 only (QUIC requires it),
    /// the ALPN identifiers `alpn`, and 0-RTT accepted (`max_early_data_size = u32::MAX`, the
    /// only non-zero value QUIC allows).
    ///
    /// Session tickets are stateful: the ticket is a key into `sessions` (share one cache
    /// across reloads, sized to the connection limit), never an encrypted self-contained
    /// session, and rustls takes it out of the cache when it is used. So a ticket resumes
    /// once, and a replayed 0-RTT first flight finds its ticket gone and gets a full
    /// handshake, without its early data.
    pub(crate) fn quic_server_config(
        &self,
        alpn: &[&[u8]],
        sessions: Arc<dyn StoresServerSessions>,
    ) -> Result<ServerConfig, TlsError> {
        let mut config = self
            .0
            .sources
            .server_config(&self.0.provider, &[&rustls::version::TLS13])?;
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        config.max_early_data_size = u32::MAX;
        config.session_storage = sessions;
        Ok(config)
    }

    /// A rustls configuration for the `relay://` listeners: the server certificates (SNI
    /// included) as they are after each reload, since the resolver asks this acceptor at
    /// every handshake; TLS 1.3 and 1.2; no client certificates (a relay client proves its
    /// node key in the relay's own handshake instead).
    #[cfg(feature = "p2p")]
    pub(crate) fn relay_server_config(&self) -> Result<ServerConfig, TlsError> {
        let builder = ServerConfig::builder_with_provider(self.0.provider.clone())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|_| TlsError::Settings("the crypto provider lacks TLS 1.2 or 1.3"))?;
        Ok(builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(CurrentCertificate(self.clone()))))
    }

    /// A session cache for [`Self::quic_server_config`] holding up to `size` tickets.
    pub(crate) fn session_cache(size: usize) -> Arc<dyn StoresServerSessions> {
        ServerSessionMemoryCache::new(size.max(1))
    }

    /// Whether clients may present certificates (`tls.ca_file` is set): then a QUIC connection
    /// waits for the handshake to end (the client's certificate verified) before MQTT, instead
    /// of reading 0-RTT data.
    pub(crate) fn verifies_clients(&self) -> bool {
        self.0.sources.client_ca.is_some()
    }

    /// The identity in a client certificate chain rustls verified (see
    /// [`crate::hooks::Peer::tls_identity`]); `None` without a client CA.
    pub(crate) fn identity_of(&self, chain: &[CertificateDer<'_>]) -> Option<Arc<str>> {
        self.verifies_clients()
            .then(|| chain.first().and_then(identity::of_certificate))
            .flatten()
    }

    /// Runs the server side of the handshake over `stream`. It sets no deadline: the caller
    /// bounds it (the connection's `connect_timeout`). What a pending handshake holds is
    /// rustls' connection state and the part of the ClientHello received so far.
    pub(crate) async fn accept<S>(&self, stream: S) -> io::Result<Accepted<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = TlsStream::accept(self.0.config.load_full(), stream).await?;
        // Only certificates rustls verified against `ca_file` get this far.
        let identity = match self.0.sources.client_ca {
            Some(_) => stream
                .connection()
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(identity::of_certificate),
            None => None,
        };
        Ok(Accepted { stream, identity })
    }
}

/// The files the server configuration is built from.
#[derive(Debug)]
struct Sources {
    cert: PathBuf,
    key: PathBuf,
    sni: Vec<(String, PathBuf, PathBuf)>,
    client_ca: Option<PathBuf>,
    require_client_cert: bool,
}

impl Sources {
    fn resolve(tls: &TlsConfig, data_dir: &Path) -> Result<Self, TlsError> {
        if tls.require_client_cert && tls.ca_file.is_none() {
            return Err(TlsError::Settings(
                "require_client_cert needs ca_file, the CA that client certificates are verified against",
            ));
        }
        if tls.use_identity_as_username && tls.ca_file.is_none() {
            return Err(TlsError::Settings(
                "use_identity_as_username needs ca_file, the CA that client certificates are verified against",
            ));
        }
        let (cert, key) = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (None, None) => {
                let generated = generate::ensure(&data_dir.join(TLS_DIR), &tls.hostnames)?;
                (generated.cert, generated.key)
            }
            (Some(_), None) => return Err(TlsError::Settings("cert_file is set but not key_file")),
            (None, Some(_)) => return Err(TlsError::Settings("key_file is set but not cert_file")),
        };
        Ok(Self {
            cert,
            key,
            sni: tls
                .sni
                .iter()
                .map(|s| {
                    (
                        s.host.to_ascii_lowercase(),
                        s.cert_file.clone(),
                        s.key_file.clone(),
                    )
                })
                .collect(),
            client_ca: tls.ca_file.clone(),
            require_client_cert: tls.require_client_cert,
        })
    }

    /// A server configuration from the files as they are now, for protocol `versions`.
    fn server_config(
        &self,
        provider: &Arc<CryptoProvider>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Result<ServerConfig, TlsError> {
        let default = load_certified_key(&self.cert, &self.key, provider)?;
        let mut by_name = HashMap::with_capacity(self.sni.len());
        for (host, cert, key) in &self.sni {
            by_name.insert(host.clone(), load_certified_key(cert, key, provider)?);
        }
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|_| TlsError::Settings("the crypto provider lacks TLS 1.2 or 1.3"))?;
        let builder = match &self.client_ca {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in load_chain(path, "client CA file")? {
                    roots.add(cert).map_err(|e| TlsError::ClientCa {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
                if !self.require_client_cert {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(SniResolver { default, by_name }));
        // One TLS 1.3 ticket per connection, not rustls' two: an MQTT client reconnects with
        // one connection at a time, and each ticket is an entry in the bounded resumption
        // cache (256 sessions, shared), so one each lets twice as many clients resume.
        config.send_tls13_tickets = 1;
        Ok(config)
    }
}

/// Reads a PEM certificate chain (or a set of CA certificates).
fn load_chain(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: "no CERTIFICATE in it".to_owned(),
        });
    }
    Ok(certs)
}

/// Reads a PEM chain and its private key, and checks that they belong together.
fn load_certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_chain(cert, "certificate file")?;
    let pem = std::fs::read(key).map_err(|source| TlsError::Read {
        what: "key file",
        path: key.to_owned(),
        source,
    })?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "key file",
        path: key.to_owned(),
        reason: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY in it".to_owned(),
            e => format!("invalid PEM: {e}"),
        },
    })?;
    if let Some(end_entity) = chain.first() {
        if identity::expired(end_entity) {
            warn!(file = %cert.display(), "the TLS certificate has expired; clients will refuse it");
        }
    }
    let certified = CertifiedKey::from_der(chain, der, provider).map_err(|e| TlsError::Key {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(certified))
}

/// Picks the certificate for the name the client asks for (SNI), else the default one.
#[derive(Debug)]
struct SniResolver {
    default: Arc<CertifiedKey>,
    /// Lower-case host name to its certificate.
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = match hello.server_name() {
            Some(name) if !self.by_name.is_empty() => self.by_name.get(&name.to_ascii_lowercase()),
            _ => None,
        };
        Some(chosen.unwrap_or(&self.default).clone())
    }
}

/// The certificate the acceptor's configuration chooses now, for configurations that
/// outlive reloads.
#[cfg(feature = "p2p")]
#[derive(Debug)]
struct CurrentCertificate(TlsAcceptor);

#[cfg(feature = "p2p")]
impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0 .0.config.load().cert_resolver.resolve(hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SniCertificate;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        SanType,
    };
    use rustls::pki_types::ServerName;

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl Ca {
        fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            Self {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A leaf with common name `cn` (none if empty) and subject alternative names `sans`;
        /// writes `<name>.pem` and `<name>-key.pem` into `dir`.
        fn leaf(&self, dir: &Path, name: &str, cn: &str, sans: Vec<SanType>) -> (PathBuf, PathBuf) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            if !cn.is_empty() {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
            params.subject_alt_names = sans;
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let (c, k) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}-key.pem")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        }
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    fn client_config(ca: &Ca, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        Arc::new(match identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    load_chain(cert, "test").unwrap(),
                    PrivateKeyDer::from_pem_file(key).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        })
    }

    /// A handshake over an in-memory pipe: the certificate the server presented and the
    /// identity it found, or the server's error.
    async fn handshake(
        acceptor: &TlsAcceptor,
        client: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<(Vec<u8>, Option<Arc<str>>), io::Error> {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let client = tokio::spawn(async move {
            let mut stream = tokio_rustls::TlsConnector::from(client)
                .connect(name, client_end)
                .await?;
            let served = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
            // In TLS 1.3 the server checks the client's certificate after the client is done:
            // a read shows the verdict.
            let mut byte = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await;
            Ok::<_, io::Error>((served, stream))
        });
        let accepted = acceptor.accept(server_end).await;
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                let _ = client.await;
                return Err(e);
            }
        };
        let identity = accepted.identity.clone();
        drop(accepted);
        let (served, _stream) = client.await.unwrap()?;
        Ok((served, identity))
    }

    fn der(path: &Path) -> Vec<u8> {
        load_chain(path, "test").unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn the_certificate_is_chosen_by_sni() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let (cert, key) = ca.leaf(
            dir.path(),
            "default",
            "default",
            vec![dns("localhost"), dns("b.example")],
        );
        let (sni_cert, sni_key) = ca.leaf(dir.path(), "a", "a", vec![dns("a.example")]);
        let tls = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key),
            sni: vec![SniCertificate {
                host: "A.Example".into(),
                cert_file: sni_cert.clone(),
                key_file: sni_key,
            }],
            ..TlsConfig::default()
        };
        let acceptor = TlsAcceptor::load(&tls, dir.path()).unwrap();
        let client = client_config(&ca, None);
        let (served, _) = handshake(&acceptor, client.clone(), "a.example")
            .await
            .unwrap();
        assert_eq!(served, der(&sni_cert));
        let (served, _) = handshake(&acceptor, client.clone(), "b.example")
            .await
            .unwrap();
        assert_eq!(
            served,
            der(&cert),
            "an unknown name gets the default certificate"
        );
        let (served, _) = handshake(&acceptor, client, "localhost").await.unwrap();
        assert_eq!(served, der(&cert));
    }

    #[tokio::test]
    async fn client_certificates_are_verified_and_name_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Ca::new();
        let clients = Ca::new();
        let (cert, key) = server_ca.leaf(dir.path(), "server", "server", vec![dns("localhost")]);
        let ca_file = dir.path().join("clients.pem");
        std::fs::write(&ca_file, &clients.pem).unwrap();
        let named = clients.leaf(
            dir.path(),
            "named",
            "device-1",
            vec![dns("ignored.example")],
        );
        let by_dns = clients.leaf(dir.path(), "dns", "", vec![dns("device-2.example")]);
        let by_mail = clients.leaf(
            dir.path(),
            "mail",
            "",
            vec![SanType::Rfc822Name("ops@example.org".try_into().unwrap())],
        );
        let stranger = Ca::new().leaf(dir.path(), "stranger", "device-1", vec![]);
        let mut tls = TlsConfig {
            cert_file: Some(cert),
            key_file: Some(key),
            ca_file: Some(ca_file),
            require_client_cert: true,
            ..TlsConfig::default()
        };
        let acceptor = TlsAcceptor::load(&tls, dir.path()).unwrap();
        let with = |leaf: &(PathBuf, PathBuf)| {
            client_config(&server_ca, Some((leaf.0.as_path(), leaf.1.as_path())))
        };
        let identity = |r: Result<(Vec<u8>, Option<Arc<str>>), io::Error>| r.unwrap().1;
        assert_eq!(
            identity(handshake(&acceptor, with(&named), "localhost").await).as_deref(),
            Some("device-1")
        );
        assert_eq!(
            identity(handshake(&acceptor, with(&by_dns), "localhost").await).as_deref(),
            Some("device-2.example")
        );
        assert_eq!(
            identity(handshake(&acceptor, with(&by_mail), "localhost").await).as_deref(),
            Some("ops@example.org")
        );
        assert!(handshake(&acceptor, with(&stranger), "localhost")
            .await
            .is_err());
        let anonymous = client_config(&server_ca, None);
        assert!(handshake(&acceptor, anonymous.clone(), "localhost")
            .await
            .is_err());

        tls.require_client_cert = false;
        let optional = TlsAcceptor::load(&tls, dir.path()).unwrap();
        assert_eq!(
            identity(handshake(&optional, anonymous, "localhost").await),
            None
        );
        assert!(handshake(&optional, with(&stranger), "localhost")
            .await
            .is_err());
    }

    #[test]
    fn contradictory_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for tls in [
            TlsConfig {
                require_client_cert: true,
                ..TlsConfig::default()
            },
            TlsConfig {
                use_identity_as_username: true,
                ..TlsConfig::default()
            },
            TlsConfig {
                cert_file: Some("cert.pem".into()),
                ..TlsConfig::default()
            },
        ] {
            assert!(matches!(
                TlsAcceptor::load(&tls, dir.path()),
                Err(TlsError::Settings(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_failed_reload_keeps_the_previous_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let (cert, key) = ca.leaf(dir.path(), "server", "one", vec![dns("localhost")]);
        let first = der(&cert);
        let tls = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            ..TlsConfig::default()
        };
        let acceptor = TlsAcceptor::load(&tls, dir.path()).unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let err = acceptor.reload().unwrap_err().to_string();
        assert!(err.contains("server-key.pem"), "{err}");
        let client = client_config(&ca, None);
        let (served, _) = handshake(&acceptor, client.clone(), "localhost")
            .await
            .unwrap();
        assert_eq!(served, first);
        ca.leaf(dir.path(), "server", "two", vec![dns("localhost")]);
        acceptor.reload().unwrap();
        let (served, _) = handshake(&acceptor, client, "localhost").await.unwrap();
        assert_eq!(served, der(&cert));
        assert_ne!(served, first);
    }
}
