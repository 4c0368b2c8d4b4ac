//! Certificates made for a test with rcgen (a CA, the server and client certificates it signs),
//! and brokers configured with them: serving a given certificate, or verifying client
//! certificates against a test CA. Shared by the TLS and the QUIC tests.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use mqttd_client::{Client, Events};
use mqttd_proto::{QoS, ReasonCode};

use super::client::{filter, publish_acked, round_trip};
use super::Broker;

/// A CA made for a test.
pub(crate) struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, PEM.
    pub(crate) pem: String,
}

/// A certificate and its key, PEM.
pub(crate) struct Leaf {
    pub(crate) cert: String,
    pub(crate) key: String,
}

impl TestCa {
    /// A new self-signed CA with common name `name`.
    pub(crate) fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed CA");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1 with common name `cn`.
    pub(crate) fn server(&self, cn: &str) -> Leaf {
        self.leaf(
            cn,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            None,
        )
    }

    /// A client certificate with common name `cn`.
    pub(crate) fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, &[], ExtendedKeyUsagePurpose::ClientAuth, None)
    }

    /// A certificate with common name `cn` for the DNS names or addresses `names`, for
    /// `usage`, valid from the start of one year to the start of another if given.
    pub(crate) fn leaf(
        &self,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        validity: Option<(i32, i32)>,
    ) -> Leaf {
        self.leaf_for(cn, names, vec![usage], validity)
    }

    /// A cluster node's certificate: its name as common name and DNS name, for both ends of
    /// mutual TLS (the node serves its peers and dials them with the same certificate).
    pub(crate) fn cluster_node(&self, name: &str) -> Leaf {
        self.leaf_for(
            name,
            &[name],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            None,
        )
    }

    fn leaf_for(
        &self,
        cn: &str,
        names: &[&str],
        usages: Vec<ExtendedKeyUsagePurpose>,
        validity: Option<(i32, i32)>,
    ) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .expect("leaf parameters");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages;
        if let Some((from, to)) = validity {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

impl Leaf {
    /// Writes the certificate and the key into `dir` as `NAME.pem` and `NAME-key.pem`;
    /// returns their paths.
    pub(crate) fn write_to(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            write(&dir.join(format!("{name}.pem")), &self.cert),
            write(&dir.join(format!("{name}-key.pem")), &self.key),
        )
    }
}

/// Writes `text` to `path` and returns the path.
pub(crate) fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).expect("write a test file");
    path.to_owned()
}

/// A broker whose TLS-based `listener` (`tls://…`, `quic://…`) serves `leaf`; and the
/// certificate and key files, which the test may rewrite before a SIGHUP.
pub(crate) fn broker_serving(leaf: &Leaf, listener: &str) -> (Broker, PathBuf, PathBuf) {
    let mut broker = Broker::configured("", &[listener]);
    let root = broker.root().to_owned();
    let (cert, key) = leaf.write_to(&root, "server");
    write(
        &root.join("mqttd.toml"),
        &format!("[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
    );
    broker.restart();
    (broker, cert, key)
}

/// A broker with `listener` (`tls://…`, `quic://…`) that verifies client certificates against
/// `clients_ca`, requires one if `required`, takes its identity as the user name, and applies
/// `acl`; and its root directory.
pub(crate) fn client_cert_broker(
    clients_ca: &TestCa,
    acl: &str,
    listener: &str,
    required: bool,
) -> (Broker, PathBuf) {
    let mut broker = Broker::configured("", &[listener]);
    let root = broker.root().to_owned();
    let ca_file = write(&root.join("clients-ca.pem"), &clients_ca.pem);
    let acl = write(&root.join("acl"), acl);
    write(
        &root.join("mqttd.toml"),
        &format!(
            "acl_file = {acl:?}\n[tls]\nca_file = {ca_file:?}\nrequire_client_cert = {required}\n\
             use_identity_as_username = true\n"
        ),
    );
    broker.restart();
    (broker, root)
}

/// An ACL for [`client_cert_broker`]: device-1 may use `devices/device-1/#`, admin everything.
pub(crate) const DEVICE_ACL: &str =
    "user device-1\ntopic readwrite devices/device-1/#\n\nuser admin\ntopic readwrite #\n";

/// Checks that the broker takes `client` for device-1 under [`DEVICE_ACL`], whatever user name
/// its CONNECT gave: its own topics are granted both ways, the others refused.
pub(crate) async fn assert_is_device_1(client: &Client, events: &mut Events) {
    let granted = client
        .subscribe_one(filter("devices/device-1/#"), QoS::AtLeastOnce)
        .await
        .expect("SUBACK");
    assert_eq!(granted.reasons, vec![ReasonCode::GrantedQoS1]);
    let refused = client
        .subscribe_one(filter("devices/device-2/#"), QoS::AtLeastOnce)
        .await
        .expect("SUBACK");
    assert_eq!(refused.reasons, vec![ReasonCode::NotAuthorized]);
    round_trip(client, events, "devices/device-1/temp", "21.5").await;
    assert_eq!(
        publish_acked(client, events, "elsewhere/temp", "no").await,
        ReasonCode::NotAuthorized
    );
}
