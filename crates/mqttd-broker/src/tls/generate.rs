//! The local CA and server certificate a broker without `tls.cert_file` makes for itself, so
//! that TLS works out of the box: `<data_dir>/tls/ca.pem` (clients trust it, e.g.
//! `mosquitto_sub --cafile`), `ca-key.pem`, and `cert.pem` / `key.pem` signed by that CA for
//! `localhost`, `127.0.0.1`, `::1` and `tls.hostnames`.
//!
//! They are made on first start and reused afterwards; the server certificate alone is issued
//! again by the same CA when the names change or it nears its end, so clients that trust the CA
//! go on working. Keys are written with mode 0600 in a directory of mode 0700, each file
//! through a temporary file and a rename, so a crash leaves either the old file or the new.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use tracing::info;

use super::{identity, TlsError};

/// The directory in the data directory that holds the generated files.
pub(crate) const TLS_DIR: &str = "tls";

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const SERVER_CERT: &str = "cert.pem";
const SERVER_KEY: &str = "key.pem";

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;
/// How long a server certificate is valid: the most that Apple's platforms accept.
const SERVER_DAYS: i64 = 825;
/// A server certificate closer than this to its end is issued again at startup.
const RENEW_DAYS: i64 = 30;

/// Where the generated local CA's certificate is (or will be) in `data_dir`.
pub(crate) fn generated_ca(data_dir: &Path) -> PathBuf {
    data_dir.join(TLS_DIR).join(CA_CERT)
}

/// The server certificate and key to use.
#[derive(Debug)]
pub(super) struct Generated {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

/// Makes or reuses the local CA and a server certificate for `hostnames` in `dir`.
pub(super) fn ensure(dir: &Path, hostnames: &[String]) -> Result<Generated, TlsError> {
    create_private_dir(dir)?;
    let ca_cert = dir.join(CA_CERT);
    let ca_key = dir.join(CA_KEY);
    let (ca_pem, ca_key_pem) = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => (read(&ca_cert)?, read(&ca_key)?),
        (false, false) => make_ca(&ca_cert, &ca_key)?,
        (true, false) | (false, true) => {
            let missing = if ca_cert.exists() { &ca_key } else { &ca_cert };
            return Err(TlsError::Generate {
                path: missing.clone(),
                reason: "the other half of the local CA is there but this file is missing; \
                         remove the directory to make a new CA (clients must then trust the \
                         new ca.pem)"
                    .to_owned(),
            });
        }
    };
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: "generated CA file",
        path: ca_cert.clone(),
        reason: format!("invalid PEM: {e}"),
    })?;
    info!(
        ca = %ca_cert.display(),
        sha256 = %fingerprint(&ca_der),
        "TLS: using the local CA; clients trust it with its file (e.g. mosquitto_sub --cafile)"
    );
    let cert = dir.join(SERVER_CERT);
    let key = dir.join(SERVER_KEY);
    let names = wanted_names(hostnames);
    if !reusable(&cert, &key, &names, &ca_der) {
        issue_server(&cert, &key, &names, &ca_pem, &ca_key_pem, &ca_cert)?;
        info!(cert = %cert.display(), ?names, "TLS: issued a server certificate signed by the local CA");
    }
    Ok(Generated { cert, key })
}

/// `localhost`, `127.0.0.1`, `::1` and the configured host names, lower-case, each once.
fn wanted_names(hostnames: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for host in hostnames {
        // An IP address in its canonical form, as it is read back from the certificate.
        let host = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => host.to_ascii_lowercase(),
        };
        if !names.contains(&host) {
            names.push(host);
        }
    }
    names
}

/// Whether the server certificate on disk was issued by this CA, covers `names`, is not near
/// its end, and has its key.
fn reusable(cert: &Path, key: &Path, names: &[String], ca: &CertificateDer<'_>) -> bool {
    if !key.exists() {
        return false;
    }
    let Ok(pem) = std::fs::read(cert) else {
        return false;
    };
    let Some(facts) = CertificateDer::from_pem_slice(&pem)
        .ok()
        .and_then(|der| identity::server_facts(&der))
    else {
        return false;
    };
    let renew_after = unix_now() + RENEW_DAYS * 86_400;
    identity::subject(ca).is_some_and(|ca_name| ca_name == facts.issuer)
        && facts.not_after > renew_after
        && names.iter().all(|n| facts.names.contains(n))
}

fn make_ca(cert: &Path, key: &Path) -> Result<(String, String), TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate {
        path: cert.to_owned(),
        reason: e.to_string(),
    };
    let signing_key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::default();
    // A name of its own per CA: clients that trust several mqttd CAs find each by name.
    let mut tag = [0u8; 4];
    getrandom::fill(&mut tag).map_err(|e| TlsError::Generate {
        path: cert.to_owned(),
        reason: e.to_string(),
    })?;
    let tag = u32::from_be_bytes(tag);
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("mqttd local CA {tag:08x}"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "mqttd");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(CA_DAYS);
    let ca = params.self_signed(&signing_key).map_err(gen_err)?;
    let (cert_pem, key_pem) = (ca.pem(), signing_key.serialize_pem());
    // The key first: a CA certificate without its key would be of no use.
    write_file(key, key_pem.as_bytes(), 0o600)?;
    write_file(cert, cert_pem.as_bytes(), 0o644)?;
    info!(ca = %cert.display(), "TLS: generated a local CA");
    Ok((cert_pem, key_pem))
}

fn issue_server(
    cert: &Path,
    key: &Path,
    names: &[String],
    ca_pem: &str,
    ca_key_pem: &str,
    ca_cert: &Path,
) -> Result<(), TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate {
        path: cert.to_owned(),
        reason: e.to_string(),
    };
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| TlsError::Pem {
        what: "generated CA key file",
        path: ca_cert.with_file_name(CA_KEY),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(|e| TlsError::Pem {
        what: "generated CA file",
        path: ca_cert.to_owned(),
        reason: e.to_string(),
    })?;
    let signing_key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "mqttd");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(SERVER_DAYS);
    let issued = params.signed_by(&signing_key, &issuer).map_err(gen_err)?;
    write_file(key, signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert, issued.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// The SHA-256 fingerprint of a certificate, as `openssl x509 -fingerprint -sha256` prints it.
pub(super) fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        what: "generated TLS file",
        path: path.to_owned(),
        source,
    })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Creates `dir` (and its parents) and makes it private to the broker's user.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let err = |source| TlsError::Read {
        what: "TLS directory",
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Writes `data` to `path` with `mode` (Unix), through a temporary file and a rename, so that
/// the file is never seen half-written nor, for a key, ever readable by others.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source: std::io::Error| TlsError::Generate {
        path: path.to_owned(),
        reason: source.to_string(),
    };
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(data).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let first = ensure(&tls, &[]).unwrap();
        let ca = std::fs::read(tls.join(CA_CERT)).unwrap();
        let cert = std::fs::read(&first.cert).unwrap();
        let again = ensure(&tls, &[]).unwrap();
        assert_eq!(again.cert, first.cert);
        assert_eq!(std::fs::read(tls.join(CA_CERT)).unwrap(), ca);
        assert_eq!(
            std::fs::read(&again.cert).unwrap(),
            cert,
            "reused as it was"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&tls), 0o700);
            assert_eq!(mode(&tls.join(CA_KEY)), 0o600);
            assert_eq!(mode(&tls.join(SERVER_KEY)), 0o600);
        }
    }

    #[test]
    fn a_new_host_name_gets_a_new_server_certificate_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let first = ensure(&tls, &[]).unwrap();
        let ca = std::fs::read(tls.join(CA_CERT)).unwrap();
        let cert = std::fs::read(&first.cert).unwrap();
        ensure(&tls, &["Broker.Example".to_owned(), "10.1.2.3".to_owned()]).unwrap();
        assert_eq!(std::fs::read(tls.join(CA_CERT)).unwrap(), ca, "same CA");
        let new = std::fs::read(&first.cert).unwrap();
        assert_ne!(new, cert, "issued again");
        let der = CertificateDer::from_pem_slice(&new).unwrap();
        let facts = identity::server_facts(&der).unwrap();
        for name in [
            "localhost",
            "127.0.0.1",
            "::1",
            "broker.example",
            "10.1.2.3",
        ] {
            assert!(facts.names.iter().any(|n| n == name), "{name} in {facts:?}");
        }
    }

    #[test]
    fn half_a_ca_is_an_error_naming_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        ensure(&tls, &[]).unwrap();
        std::fs::remove_file(tls.join(CA_KEY)).unwrap();
        let err = ensure(&tls, &[]).unwrap_err().to_string();
        assert!(err.contains(CA_KEY), "{err}");
    }
}
