//! TLS with rustls (ring provider): trust anchors from a PEM file or the system's store, an
//! optional client certificate, and errors that say which check failed.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{TlsOptions, TlsVersion, TransportError};

/// Where the system keeps its CA bundle, by distribution; `SSL_CERT_FILE` comes first.
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A loaded TLS client configuration and the server name to present and check.
#[derive(Clone)]
pub(super) struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl Tls {
    pub(super) fn new(host: &str, options: &TlsOptions) -> Result<Self, TransportError> {
        let versions: &[&rustls::SupportedProtocolVersion] = match options.version {
            None => rustls::DEFAULT_VERSIONS,
            Some(TlsVersion::Tls12) => &[&rustls::version::TLS12],
            Some(TlsVersion::Tls13) => &[&rustls::version::TLS13],
        };
        let config = client_config(options, versions, verifier(options)?)?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: server_name(host)?,
        })
    }

    pub(super) async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, TransportError> {
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| TransportError::Tls(TlsError::from_io(&e)))
    }
}

/// The check of the server's certificate `options` ask for: the chain against the CA file
/// and directory (or the system's CAs), and the host name unless `insecure`.
pub(super) fn verifier(
    options: &TlsOptions,
) -> Result<Arc<dyn ServerCertVerifier>, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(load_roots(
        options.ca_file.as_deref(),
        options.ca_path.as_deref(),
    )?);
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TransportError::TlsConfig(format!("certificate verifier: {e}")))?;
    Ok(match options.insecure {
        true => Arc::new(AnyHostName {
            inner: verifier,
            provider,
        }),
        false => verifier,
    })
}

/// The ring provider, offering TLS 1.3's AES-128-GCM (with SHA-256) before AES-256-GCM (with
/// SHA-384): a server that follows the client's order then derives its keys with SHA-256,
/// which CPUs accelerate (SHA-NI, ARMv8 SHA) where SHA-384 runs in software, a tenth of a
/// handshake's CPU on both sides. ChaCha20 stays last: a client offers its own order.
fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
            _ => 2,
        });
    provider
}

/// A client configuration with the ring provider, `versions`, `verifier` and the client
/// certificate `options` name.
pub(super) fn client_config(
    options: &TlsOptions,
    versions: &[&'static rustls::SupportedProtocolVersion],
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<rustls::ClientConfig, TransportError> {
    let config_err = TransportError::TlsConfig;
    let provider = Arc::new(provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| config_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_err(format!("{}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| config_err(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| config_err(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(config_err(
            "a client certificate needs both a certificate and a key file".into(),
        )),
    }
}

/// `host` as the TLS server name to present and check.
pub(super) fn server_name(host: &str) -> Result<ServerName<'static>, TransportError> {
    ServerName::try_from(host.to_owned())
        .map_err(|_| TransportError::TlsConfig(format!("{host:?} is not a valid TLS server name")))
}

/// The CA certificates in `file` and in the PEM files of directory `dir`; without either,
/// those of the system's bundle.
fn load_roots(file: Option<&Path>, dir: Option<&Path>) -> Result<RootCertStore, TransportError> {
    let Some(dir) = dir else {
        return load_file(file);
    };
    let mut roots = match file {
        Some(_) => load_file(file)?,
        None => RootCertStore::empty(),
    };
    load_dir(dir, &mut roots)?;
    Ok(roots)
}

/// Adds the CA certificates of every PEM file in `dir` (as `openssl rehash` directories and
/// `/etc/ssl/certs` hold them); other files, and certificates webpki cannot use, are skipped.
/// A directory without a usable CA certificate is an error.
fn load_dir(dir: &Path, roots: &mut RootCertStore) -> Result<(), TransportError> {
    let fail = |e: &dyn fmt::Display| TransportError::TlsConfig(format!("{}: {e}", dir.display()));
    let mut files = std::fs::read_dir(dir)
        .map_err(|e| fail(&e))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    // The same certificates in the same order on every run.
    files.sort();
    let mut added = 0;
    for path in files.iter().filter(|p| p.is_file()) {
        let Ok(certs) = CertificateDer::pem_file_iter(path) else {
            continue;
        };
        for cert in certs.flatten() {
            if roots.add(cert).is_ok() {
                added += 1;
            }
        }
    }
    if added == 0 {
        return Err(fail(&"no CA certificate in the directory's PEM files"));
    }
    Ok(())
}

/// The CA certificates in `file`, or in the system's bundle.
fn load_file(file: Option<&Path>) -> Result<RootCertStore, TransportError> {
    let system;
    let path = match file {
        Some(path) => path,
        None => {
            system = std::env::var_os("SSL_CERT_FILE")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    SYSTEM_CA_FILES
                        .iter()
                        .map(std::path::PathBuf::from)
                        .find(|p| p.is_file())
                })
                .ok_or_else(|| {
                    TransportError::TlsConfig(
                        "no CA file given and no system CA bundle found".into(),
                    )
                })?;
            &system
        }
    };
    let fail = |e: &dyn fmt::Display| TransportError::TlsConfig(format!("{}: {e}", path.display()));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| fail(&e))? {
        let cert = cert.map_err(|e| fail(&e))?;
        // A system bundle may hold certificates webpki cannot use; skip those, as browsers do.
        if let Err(e) = roots.add(cert) {
            if file.is_some() {
                return Err(fail(&e));
            }
        }
    }
    if roots.is_empty() {
        return Err(fail(&"no CA certificate in the file"));
    }
    Ok(roots)
}

/// Verifies the chain as usual but accepts a certificate issued for another name.
#[derive(Debug)]
struct AnyHostName {
    inner: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (issuer, validity, signatures) before the name, so an error
        // about the name means everything else passed.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(e))
                if CertCheck::of(&e) == CertCheck::NameMismatch =>
            {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Which check of the server's certificate failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CertCheck {
    /// The chain does not lead to a trusted CA.
    UnknownIssuer,
    /// The certificate is not valid for the host name connected to.
    NameMismatch,
    /// The certificate has expired.
    Expired,
    /// The certificate is not valid yet.
    NotYetValid,
    /// The certificate was revoked.
    Revoked,
    /// A signature in the chain does not verify.
    BadSignature,
    /// The certificate may not be used to identify a server.
    WrongPurpose,
    /// Another problem (see the message).
    Other,
}

impl CertCheck {
    pub(super) fn of(error: &CertificateError) -> Self {
        match error {
            CertificateError::UnknownIssuer => Self::UnknownIssuer,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Self::NameMismatch
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Self::NotYetValid
            }
            CertificateError::Revoked => Self::Revoked,
            CertificateError::BadSignature => Self::BadSignature,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                Self::WrongPurpose
            }
            _ => Self::Other,
        }
    }
}

impl fmt::Display for CertCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownIssuer => "unknown CA",
            Self::NameMismatch => "host name mismatch",
            Self::Expired => "certificate expired",
            Self::NotYetValid => "certificate not yet valid",
            Self::Revoked => "certificate revoked",
            Self::BadSignature => "bad signature",
            Self::WrongPurpose => "certificate not for server use",
            Self::Other => "certificate rejected",
        })
    }
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The server's certificate failed a check.
    #[error("TLS: {check}: {detail}")]
    Certificate {
        /// The check.
        check: CertCheck,
        /// rustls' description.
        detail: String,
    },
    /// The server aborted the handshake with an alert (for example: it wants a client
    /// certificate, or it does not trust ours).
    #[error("TLS: the server refused the handshake: {0}")]
    Alert(String),
    /// Anything else: the server does not speak TLS, no common protocol version, a closed
    /// connection.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

impl TlsError {
    /// The check that failed, for certificate errors.
    pub fn cert_check(&self) -> Option<CertCheck> {
        match self {
            Self::Certificate { check, .. } => Some(*check),
            _ => None,
        }
    }

    /// The TLS error inside an I/O error from a TLS stream, if there is one (for example the
    /// alert by which a TLS 1.3 server refuses a client certificate after the handshake).
    pub fn from_io_error(error: &std::io::Error) -> Option<Self> {
        let inner = error.get_ref()?.downcast_ref::<rustls::Error>()?;
        Some(Self::from_rustls(inner))
    }

    pub(super) fn from_rustls(error: &rustls::Error) -> Self {
        match error {
            rustls::Error::InvalidCertificate(e) => Self::Certificate {
                check: CertCheck::of(e),
                detail: describe(e),
            },
            rustls::Error::AlertReceived(alert) => Self::Alert(format!("{alert:?}")),
            other => Self::Handshake(other.to_string()),
        }
    }

    /// Classifies the error tokio-rustls reports: rustls' own error wrapped in an I/O error.
    fn from_io(error: &std::io::Error) -> Self {
        match Self::from_io_error(error) {
            Some(e) => e,
            None if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                Self::Handshake("the server closed the connection during the handshake".into())
            }
            None => Self::Handshake(error.to_string()),
        }
    }
}

/// rustls' message, with the names and dates its context variants carry.
fn describe(error: &CertificateError) -> String {
    match error {
        CertificateError::UnknownIssuer => {
            "the certificate chain does not lead to a trusted CA".into()
        }
        other => rustls::Error::InvalidCertificate(other.clone()).to_string(),
    }
}
