//! SCRAM-SHA-256 ([RFC 5802], [RFC 7677]) for MQTT 5 enhanced authentication.
//!
//! The exchange is the one EMQX speaks: CONNECT carries the authentication method
//! [`MECHANISM`] and the client-first message as authentication data, the server answers with
//! AUTH (continue, 0x18) carrying server-first, the client sends AUTH with client-final, and
//! the server's CONNACK carries server-final (`v=...`). The messages are the raw RFC 5802
//! strings, with no extra framing.
//!
//! Both roles are sans-IO state machines with one type per state, so a message can only be
//! handled in the state that expects it:
//!
//! ```text
//! server:  ScramServer::start(client-first) ──► ScramServerFirstSent ──finish(client-final)──► server-final
//! client:  ScramClient::new() ──► ScramClient ──handle_server_first()──► ScramClientFinalSent
//!                                                                          └─verify_server_final()
//! ```
//!
//! # Choices
//!
//! - **No channel binding.** The GS2 header must be `n,,` or `y,,` (the client supports
//!   binding but thinks we do not, which is true: we do not offer `SCRAM-SHA-256-PLUS`). A
//!   `p=` header is refused with [`ScramError::ChannelBindingUnsupported`]. An authorization
//!   identity (`a=`) is accepted only if it names the authenticating user.
//! - **User names are not SASLprep'd.** They are compared byte for byte with the password
//!   file, exactly as the CONNECT user name is, so one name works for both kinds of login.
//!   `=2C` and `=3D` escapes are decoded as RFC 5802 requires.
//! - **Passwords are SASLprep'd where SASLprep applies** ([`normalize_password`]): a password
//!   that is valid UTF-8 and passes SASLprep ([RFC 4013]) is normalised, anything else (not
//!   UTF-8, or containing characters SASLprep prohibits) is used as raw bytes. Printable ASCII
//!   is its own SASLprep, so ASCII passwords are always used as they are. This is the rule
//!   libpq and `tokio-postgres` follow, and the password file applies the same function, so a
//!   password stored by `set_password` and one sent through SCRAM always agree.
//! - **Unknown users are indistinguishable from known ones** during the exchange: the server
//!   answers with a salt derived from a server secret and the user name (stable across
//!   attempts) and the configured iteration count, and fails at the proof with the same error
//!   as a wrong password. Keep the secret stable across restarts, or a changing salt tells an
//!   observer that the user does not exist.
//! - Proofs and signatures are compared in constant time; nonces come from the operating
//!   system's CSPRNG.
//!
//! [RFC 5802]: https://www.rfc-editor.org/rfc/rfc5802
//! [RFC 7677]: https://www.rfc-editor.org/rfc/rfc7677
//! [RFC 4013]: https://www.rfc-editor.org/rfc/rfc4013

use std::borrow::Cow;
use std::fmt;
use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use mqttd_proto::ReasonCode;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The MQTT 5 authentication method name for this mechanism.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// Length of SHA-256 output, and so of every key and proof.
const KEY_LEN: usize = 32;
/// Random bytes in a nonce; 18 bytes encode to 24 base64 characters without padding.
const NONCE_BYTES: usize = 18;
/// Length of the salts this module generates.
pub const SALT_LEN: usize = 16;

/// A PBKDF2 iteration count for SCRAM, within [`Iterations::MIN`]..=[`Iterations::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Iterations(NonZeroU32);

const fn nonzero(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("iteration constants are non-zero"),
    }
}

impl Iterations {
    /// RFC 7677 section 4: the count SHOULD be at least 4096.
    pub const MIN: Self = Self(nonzero(4096));
    /// What [`PasswordFile::set_password`](super::PasswordFile::set_password) callers should
    /// use unless configured otherwise.
    pub const DEFAULT: Self = Self(nonzero(10_000));
    /// The most a client will compute for a server: beyond this, one login costs seconds of
    /// CPU, which a hostile server could use to stall clients.
    pub const MAX: Self = Self(nonzero(10_000_000));

    /// Checks that `n` lies within [`Iterations::MIN`]..=[`Iterations::MAX`].
    pub fn new(n: u32) -> Result<Self, IterationsError> {
        match NonZeroU32::new(n) {
            Some(v) if (Self::MIN.0..=Self::MAX.0).contains(&v) => Ok(Self(v)),
            _ => Err(IterationsError(n)),
        }
    }

    /// The count.
    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl Default for Iterations {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Iterations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An iteration count outside the accepted range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "iteration count {0} is outside {min}..={max}",
    min = Iterations::MIN,
    max = Iterations::MAX
)]
pub struct IterationsError(pub u32);

/// What a server stores for one user: enough to verify a SCRAM proof (and a plaintext
/// password), but not enough to impersonate the user to another server.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredentials {
    iterations: Iterations,
    salt: Box<[u8]>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl ScramCredentials {
    /// Derives the credentials for `password` (normalised by [`normalize_password`]).
    pub fn derive(password: &[u8], salt: &[u8], iterations: Iterations) -> Self {
        let keys = ClientKeys::derive(password, salt, iterations);
        Self {
            iterations,
            salt: salt.into(),
            stored_key: keys.stored_key,
            server_key: keys.server_key,
        }
    }

    /// Derives the credentials for `password` with a fresh random salt of [`SALT_LEN`] bytes.
    pub fn generate(password: &[u8], iterations: Iterations) -> Result<Self, getrandom::Error> {
        let mut salt = [0; SALT_LEN];
        getrandom::fill(&mut salt)?;
        Ok(Self::derive(password, &salt, iterations))
    }

    /// Reassembles stored credentials, e.g. from a password file.
    pub fn from_parts(
        iterations: Iterations,
        salt: impl Into<Box<[u8]>>,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    ) -> Self {
        Self {
            iterations,
            salt: salt.into(),
            stored_key,
            server_key,
        }
    }

    /// The PBKDF2 iteration count.
    pub fn iterations(&self) -> Iterations {
        self.iterations
    }

    /// The PBKDF2 salt.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// `H(HMAC(SaltedPassword, "Client Key"))`.
    pub fn stored_key(&self) -> &[u8; 32] {
        &self.stored_key
    }

    /// `HMAC(SaltedPassword, "Server Key")`.
    pub fn server_key(&self) -> &[u8; 32] {
        &self.server_key
    }

    /// Whether `password` is the one these credentials were derived from. Costs one PBKDF2
    /// run; the final comparison is constant time.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let keys = ClientKeys::derive(password, &self.salt, self.iterations);
        keys.stored_key.ct_eq(&self.stored_key).into()
    }
}

impl fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The keys are password equivalents for offline guessing; keep them out of logs.
        f.debug_struct("ScramCredentials")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

/// Applies SASLprep ([RFC 4013]) to a password where it applies and leaves it as raw bytes
/// where it does not (not UTF-8, or containing characters SASLprep prohibits). Printable
/// ASCII passes through unchanged.
///
/// [RFC 4013]: https://www.rfc-editor.org/rfc/rfc4013
pub fn normalize_password(password: &[u8]) -> Cow<'_, [u8]> {
    if password.iter().all(|b| (0x20..0x7f).contains(b)) {
        // Printable ASCII is its own SASLprep; skip the Unicode tables.
        return Cow::Borrowed(password);
    }
    match std::str::from_utf8(password).map(stringprep::saslprep) {
        Ok(Ok(Cow::Owned(normalized))) => Cow::Owned(normalized.into_bytes()),
        _ => Cow::Borrowed(password),
    }
}

/// Why a SCRAM exchange failed.
///
/// [`ScramError::reason_code`] maps each variant onto the MQTT 5 reason code to send:
///
/// | variant | reason code |
/// |---|---|
/// | [`InvalidProof`](Self::InvalidProof), [`InvalidUsername`](Self::InvalidUsername), [`ServerRejected`](Self::ServerRejected) | 0x86 Bad User Name or Password |
/// | [`AuthzidNotSupported`](Self::AuthzidNotSupported) | 0x87 Not Authorized |
/// | [`ChannelBindingUnsupported`](Self::ChannelBindingUnsupported), [`MandatoryExtension`](Self::MandatoryExtension) | 0x8C Bad Authentication Method |
/// | [`Malformed`](Self::Malformed), [`ChannelBindingMismatch`](Self::ChannelBindingMismatch), [`NonceMismatch`](Self::NonceMismatch) | 0x82 Protocol Error |
/// | [`InvalidServerSignature`](Self::InvalidServerSignature), [`IterationCount`](Self::IterationCount) | 0x83 Implementation Specific Error |
/// | [`Random`](Self::Random) | 0x80 Unspecified Error |
///
/// The last two rows are raised only by the client, which may not send 0x86 or 0x87 in a
/// DISCONNECT: 0x83 says "a valid packet this client does not accept".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScramError {
    /// A message is not in RFC 5802 syntax; names the part that is wrong.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding (`p=`), i.e. `SCRAM-SHA-256-PLUS`.
    #[error("channel binding is not supported")]
    ChannelBindingUnsupported,
    /// The `c=` attribute of client-final does not repeat the GS2 header of client-first.
    #[error("channel binding data does not match the GS2 header")]
    ChannelBindingMismatch,
    /// A message carries the reserved mandatory-extension attribute `m=` (RFC 5802 5.1).
    #[error("unsupported mandatory extension")]
    MandatoryExtension,
    /// The authorization identity (`a=`) names someone other than the user.
    #[error("authorization identity differs from the user name")]
    AuthzidNotSupported,
    /// The user name is empty or contains a character it may not.
    #[error("invalid user name")]
    InvalidUsername,
    /// The nonce does not continue the exchange: client-final does not repeat the combined
    /// nonce, or server-first does not extend the client's nonce.
    #[error("nonce does not match the exchange")]
    NonceMismatch,
    /// The server announced an iteration count outside [`Iterations::MIN`]..=[`Iterations::MAX`].
    #[error(transparent)]
    IterationCount(#[from] IterationsError),
    /// The client's proof is wrong: wrong password or unknown user, deliberately not told
    /// apart.
    #[error("bad user name or password")]
    InvalidProof,
    /// The server's signature does not verify: it does not know the user's credentials.
    #[error("server signature does not verify")]
    InvalidServerSignature,
    /// The server ended the exchange with `e=` and this value.
    #[error("server rejected the authentication: {0}")]
    ServerRejected(String),
    /// The operating system's random number generator failed.
    #[error("random number generator failed: {0}")]
    Random(getrandom::Error),
}

impl ScramError {
    /// The MQTT 5 reason code that answers this error (see the table on [`ScramError`]).
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::InvalidProof | Self::InvalidUsername | Self::ServerRejected(_) => {
                ReasonCode::BadUserNameOrPassword
            }
            Self::AuthzidNotSupported => ReasonCode::NotAuthorized,
            Self::ChannelBindingUnsupported | Self::MandatoryExtension => {
                ReasonCode::BadAuthenticationMethod
            }
            Self::Malformed(_) | Self::ChannelBindingMismatch | Self::NonceMismatch => {
                ReasonCode::ProtocolError
            }
            Self::InvalidServerSignature | Self::IterationCount(_) => {
                ReasonCode::ImplementationSpecificError
            }
            Self::Random(_) => ReasonCode::UnspecifiedError,
        }
    }
}

/// The server role's configuration; [`ScramServer::start`] begins one exchange.
///
/// One value serves every connection of a broker.
pub struct ScramServer {
    secret: [u8; 32],
    unknown_user_iterations: Iterations,
}

impl ScramServer {
    /// A server whose answers for unknown users derive from `secret`. Keep the secret stable
    /// across restarts (see the module documentation).
    pub fn new(secret: [u8; 32]) -> Self {
        Self {
            secret,
            unknown_user_iterations: Iterations::DEFAULT,
        }
    }

    /// A server with a random secret, for tests and brokers that do not persist one.
    pub fn with_random_secret() -> Result<Self, getrandom::Error> {
        let mut secret = [0; 32];
        getrandom::fill(&mut secret)?;
        Ok(Self::new(secret))
    }

    /// The iteration count announced for unknown users; set it to the count most users
    /// have, so that it does not stand out. Defaults to [`Iterations::DEFAULT`].
    pub fn with_unknown_user_iterations(mut self, iterations: Iterations) -> Self {
        self.unknown_user_iterations = iterations;
        self
    }

    /// Handles client-first and returns server-first. `lookup` finds the user's credentials;
    /// when it finds none the exchange goes on with made-up ones and fails at
    /// [`ScramServerFirstSent::finish`] as a wrong password would.
    pub fn start(
        &self,
        client_first: &[u8],
        lookup: impl FnOnce(&str) -> Option<ScramCredentials>,
    ) -> Result<(ScramServerFirstSent, Vec<u8>), ScramError> {
        let nonce = random_nonce()?;
        self.start_with_nonce(client_first, lookup, &nonce)
    }

    fn start_with_nonce(
        &self,
        client_first: &[u8],
        lookup: impl FnOnce(&str) -> Option<ScramCredentials>,
        server_nonce: &str,
    ) -> Result<(ScramServerFirstSent, Vec<u8>), ScramError> {
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first is not UTF-8"))?;
        let parsed = parse_client_first(msg)?;
        let (credentials, known) = match lookup(&parsed.username) {
            Some(credentials) => (credentials, true),
            None => (self.fake_credentials(&parsed.username), false),
        };
        let nonce = format!("{}{server_nonce}", parsed.client_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(credentials.salt()),
            credentials.iterations()
        );
        let state = ScramServerFirstSent {
            username: parsed.username,
            credentials,
            known,
            gs2_header: parsed.gs2_header.to_owned(),
            client_first_bare: parsed.bare.to_owned(),
            nonce,
            server_first: server_first.clone(),
        };
        Ok((state, server_first.into_bytes()))
    }

    /// Credentials for a user that does not exist: a salt that is the same on every attempt,
    /// and keys nobody can produce a proof for.
    fn fake_credentials(&self, username: &str) -> ScramCredentials {
        let mut salt = [0; SALT_LEN];
        let tag = hmac(
            &self.secret,
            &[b"mqttd scram unknown-user salt\0", username.as_bytes()],
        );
        salt.copy_from_slice(tag.get(..SALT_LEN).unwrap_or(&[0; SALT_LEN]));
        let stored_key = hmac(&self.secret, &[b"mqttd scram unknown-user key\0", &salt]);
        ScramCredentials::from_parts(self.unknown_user_iterations, salt, stored_key, stored_key)
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer")
            .field("unknown_user_iterations", &self.unknown_user_iterations)
            .finish_non_exhaustive()
    }
}

/// The server has sent server-first and waits for client-final.
pub struct ScramServerFirstSent {
    username: String,
    credentials: ScramCredentials,
    known: bool,
    gs2_header: String,
    client_first_bare: String,
    nonce: String,
    server_first: String,
}

impl ScramServerFirstSent {
    /// The user name the client claims; authenticated only once [`Self::finish`] succeeds.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// Checks client-final's proof and returns server-final (`v=...`), which proves to the
    /// client that the server knows its credentials.
    pub fn finish(self, client_final: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final is not UTF-8"))?;
        // The proof is the last attribute (RFC 5802 section 7); the AuthMessage covers
        // everything before it.
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final has no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attr(attrs.next(), 'c', "client-final has no channel binding")?;
        let binding = BASE64
            .decode(binding)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if binding != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        let nonce = attr(attrs.next(), 'r', "client-final has no nonce")?;
        if nonce != self.nonce {
            return Err(ScramError::NonceMismatch);
        }
        check_extensions(attrs)?;
        let proof = decode_key(proof, "client proof")?;

        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.credentials.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &signature);
        let stored_key = sha256(&client_key);
        let proof_ok: bool = stored_key.ct_eq(&self.credentials.stored_key).into();
        // `known` is checked after the hashing so an unknown user costs the same work.
        if !(proof_ok & self.known) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&self.credentials.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }
}

impl fmt::Debug for ScramServerFirstSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServerFirstSent")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The client has sent client-first and waits for server-first.
pub struct ScramClient {
    password: Vec<u8>,
    client_nonce: String,
    client_first_bare: String,
}

/// The GS2 header we send: no channel binding, no authorization identity.
const GS2_HEADER: &str = "n,,";

impl ScramClient {
    /// Starts an exchange for `username` and returns client-first, to send as CONNECT's
    /// authentication data.
    pub fn new(username: &str, password: &[u8]) -> Result<(Self, Vec<u8>), ScramError> {
        let nonce = random_nonce()?;
        Self::with_nonce(username, password, &nonce)
    }

    fn with_nonce(
        username: &str,
        password: &[u8],
        nonce: &str,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        if username.is_empty() || username.contains('\0') {
            return Err(ScramError::InvalidUsername);
        }
        let escaped = username.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={escaped},r={nonce}");
        let message = format!("{GS2_HEADER}{client_first_bare}").into_bytes();
        let state = Self {
            password: normalize_password(password).into_owned(),
            client_nonce: nonce.to_owned(),
            client_first_bare,
        };
        Ok((state, message))
    }

    /// Handles server-first and returns client-final. Costs one PBKDF2 run with the
    /// server's iteration count.
    pub fn handle_server_first(
        self,
        server_first: &[u8],
    ) -> Result<(ScramClientFinalSent, Vec<u8>), ScramError> {
        let msg = std::str::from_utf8(server_first)
            .map_err(|_| ScramError::Malformed("server-first is not UTF-8"))?;
        let mut attrs = msg.split(',');
        let first = attrs.next();
        if first.is_some_and(|a| a.starts_with("m=")) {
            return Err(ScramError::MandatoryExtension);
        }
        let nonce = attr(first, 'r', "server-first has no nonce")?;
        let server_part = nonce
            .strip_prefix(self.client_nonce.as_str())
            .ok_or(ScramError::NonceMismatch)?;
        if server_part.is_empty() || !is_printable(server_part) {
            return Err(ScramError::NonceMismatch);
        }
        let salt = attr(attrs.next(), 's', "server-first has no salt")?;
        let salt = BASE64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations = attr(attrs.next(), 'i', "server-first has no iteration count")?;
        let iterations = parse_decimal(iterations)
            .ok_or(ScramError::Malformed("iteration count is not a number"))?;
        let iterations = Iterations::new(iterations)?;
        check_extensions(attrs)?;

        let keys = ClientKeys::derive_normalized(&self.password, &salt, iterations);
        let binding = BASE64.encode(GS2_HEADER);
        let without_proof = format!("c={binding},r={nonce}");
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let signature = hmac(&keys.stored_key, &[auth_message.as_bytes()]);
        let proof = xor(&keys.client_key, &signature);
        let server_signature = hmac(&keys.server_key, &[auth_message.as_bytes()]);
        let client_final = format!("{without_proof},p={}", BASE64.encode(proof));
        Ok((
            ScramClientFinalSent { server_signature },
            client_final.into_bytes(),
        ))
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient").finish_non_exhaustive()
    }
}

/// The client has sent client-final and waits for server-final.
pub struct ScramClientFinalSent {
    server_signature: [u8; KEY_LEN],
}

impl ScramClientFinalSent {
    /// Checks server-final: the server must prove it knows the user's credentials.
    pub fn verify_server_final(self, server_final: &[u8]) -> Result<(), ScramError> {
        let msg = std::str::from_utf8(server_final)
            .map_err(|_| ScramError::Malformed("server-final is not UTF-8"))?;
        if let Some(error) = msg.strip_prefix("e=") {
            return Err(ScramError::ServerRejected(error.to_owned()));
        }
        let mut attrs = msg.split(',');
        let verifier = attr(attrs.next(), 'v', "server-final has no verifier")?;
        check_extensions(attrs)?;
        let signature = decode_key(verifier, "server signature")?;
        if bool::from(signature.ct_eq(&self.server_signature)) {
            Ok(())
        } else {
            Err(ScramError::InvalidServerSignature)
        }
    }
}

impl fmt::Debug for ScramClientFinalSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClientFinalSent")
            .finish_non_exhaustive()
    }
}

/// The keys a client derives from its password (RFC 5802 section 3).
struct ClientKeys {
    client_key: [u8; KEY_LEN],
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl ClientKeys {
    fn derive(password: &[u8], salt: &[u8], iterations: Iterations) -> Self {
        Self::derive_normalized(&normalize_password(password), salt, iterations)
    }

    fn derive_normalized(password: &[u8], salt: &[u8], iterations: Iterations) -> Self {
        let mut salted = [0; KEY_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations.get(), &mut salted);
        let client_key = hmac(&salted, &[b"Client Key"]);
        Self {
            client_key,
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }
}

/// The parts of client-first the server needs.
struct ClientFirst<'a> {
    gs2_header: &'a str,
    bare: &'a str,
    username: String,
    client_nonce: &'a str,
}

fn parse_client_first(msg: &str) -> Result<ClientFirst<'_>, ScramError> {
    let (flag, rest) = msg
        .split_once(',')
        .ok_or(ScramError::Malformed("client-first has no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        _ if flag.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
        _ => return Err(ScramError::Malformed("invalid channel binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("client-first has no GS2 header"))?;
    let gs2_header = msg
        .get(..msg.len() - bare.len())
        .ok_or(ScramError::Malformed("client-first has no GS2 header"))?;
    let authzid = match authzid {
        "" => None,
        a => Some(decode_saslname(a.strip_prefix("a=").ok_or(
            ScramError::Malformed("invalid authorization identity"),
        )?)?),
    };

    let mut attrs = bare.split(',');
    let first = attrs.next();
    if first.is_some_and(|a| a.starts_with("m=")) {
        return Err(ScramError::MandatoryExtension);
    }
    let username = decode_saslname(attr(first, 'n', "client-first has no user name")?)?;
    let client_nonce = attr(attrs.next(), 'r', "client-first has no nonce")?;
    if client_nonce.is_empty() || !is_printable(client_nonce) {
        return Err(ScramError::Malformed("invalid client nonce"));
    }
    check_extensions(attrs)?;
    if authzid.is_some_and(|a| a != username) {
        return Err(ScramError::AuthzidNotSupported);
    }
    Ok(ClientFirst {
        gs2_header,
        bare,
        username,
        client_nonce,
    })
}

/// The value of `name=value`, or `missing` as the error.
fn attr<'a>(
    field: Option<&'a str>,
    name: char,
    missing: &'static str,
) -> Result<&'a str, ScramError> {
    let field = field.ok_or(ScramError::Malformed(missing))?;
    let mut chars = field.chars();
    match (chars.next(), chars.next()) {
        (Some(n), Some('=')) if n == name => Ok(chars.as_str()),
        _ => Err(ScramError::Malformed(missing)),
    }
}

/// Optional extensions after the known attributes: each must look like `x=...`; their
/// meaning is ignored, as RFC 5802 allows for extensions that are not mandatory.
fn check_extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), ScramError> {
    for field in attrs {
        let mut chars = field.chars();
        match (chars.next(), chars.next()) {
            (Some('m'), Some('=')) => return Err(ScramError::MandatoryExtension),
            (Some(c), Some('=')) if c.is_ascii_alphabetic() => {}
            _ => return Err(ScramError::Malformed("invalid attribute")),
        }
    }
    Ok(())
}

/// Decodes a `saslname`: `=2C` is `,`, `=3D` is `=`, any other `=` or a NUL is invalid.
fn decode_saslname(name: &str) -> Result<String, ScramError> {
    if name.is_empty() {
        return Err(ScramError::InvalidUsername);
    }
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(pos) = rest.find('=') {
        out.push_str(rest.get(..pos).unwrap_or_default());
        let escape = rest.get(pos..pos + 3);
        match escape {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("invalid escape in user name")),
        }
        rest = rest.get(pos + 3..).unwrap_or_default();
    }
    out.push_str(rest);
    if out.contains('\0') {
        return Err(ScramError::InvalidUsername);
    }
    Ok(out)
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E, i.e. visible ASCII except `,`.
fn is_printable(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// A plain decimal number with no sign or leading `+`, as `str::parse` would also accept.
fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn decode_key(b64: &str, what: &'static str) -> Result<[u8; KEY_LEN], ScramError> {
    let bytes = BASE64
        .decode(b64)
        .map_err(|_| ScramError::Malformed(what))?;
    bytes.try_into().map_err(|_| ScramError::Malformed(what))
}

fn random_nonce() -> Result<String, ScramError> {
    let mut bytes = [0; NONCE_BYTES];
    getrandom::fill(&mut bytes).map_err(ScramError::Random)?;
    Ok(BASE64.encode(bytes))
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    // HMAC hashes long keys and pads short ones: every length is valid.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key) else {
        unreachable!("HMAC accepts keys of any length")
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 7677 section 3.
    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                    s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                    p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    /// The RFC's user, derived once: PBKDF2 is slow in debug builds.
    fn pencil() -> ScramCredentials {
        static PENCIL: std::sync::LazyLock<ScramCredentials> = std::sync::LazyLock::new(|| {
            let salt = BASE64.decode(RFC_SALT).unwrap();
            ScramCredentials::derive(b"pencil", &salt, Iterations::new(4096).unwrap())
        });
        PENCIL.clone()
    }

    fn server() -> ScramServer {
        ScramServer::new([7; 32])
    }

    /// Runs a whole exchange; returns the server's outcome and, if it succeeded, the
    /// client's verdict on server-final.
    fn exchange(
        server: &ScramServer,
        user: &str,
        password: &[u8],
        stored: Option<ScramCredentials>,
    ) -> Result<Result<(), ScramError>, ScramError> {
        let (client, client_first) = ScramClient::new(user, password).unwrap();
        let (server_state, server_first) = server.start(&client_first, |_| stored)?;
        assert_eq!(server_state.username(), user);
        let (client, client_final) = client.handle_server_first(&server_first).unwrap();
        let server_final = server_state.finish(&client_final)?;
        Ok(client.verify_server_final(&server_final))
    }

    #[test]
    fn rfc7677_test_vector() {
        let (client, client_first) =
            ScramClient::with_nonce("user", b"pencil", RFC_CLIENT_NONCE).unwrap();
        assert_eq!(client_first, RFC_CLIENT_FIRST.as_bytes());

        let mut looked_up = None;
        let (server_state, server_first) = server()
            .start_with_nonce(
                &client_first,
                |user| {
                    looked_up = Some(user.to_owned());
                    Some(pencil())
                },
                RFC_SERVER_NONCE,
            )
            .unwrap();
        assert_eq!(looked_up.as_deref(), Some("user"));
        assert_eq!(
            String::from_utf8(server_first.clone()).unwrap(),
            RFC_SERVER_FIRST
        );

        let (client, client_final) = client.handle_server_first(&server_first).unwrap();
        assert_eq!(
            String::from_utf8(client_final.clone()).unwrap(),
            RFC_CLIENT_FINAL
        );

        let server_final = server_state.finish(&client_final).unwrap();
        assert_eq!(
            String::from_utf8(server_final.clone()).unwrap(),
            RFC_SERVER_FINAL
        );
        client.verify_server_final(&server_final).unwrap();
    }

    #[test]
    fn rfc7677_server_accepts_rfc_client_final() {
        // The server alone, fed the RFC's literal client messages.
        let (state, server_first) = server()
            .start_with_nonce(
                RFC_CLIENT_FIRST.as_bytes(),
                |_| Some(pencil()),
                RFC_SERVER_NONCE,
            )
            .unwrap();
        assert_eq!(server_first, RFC_SERVER_FIRST.as_bytes());
        let server_final = state.finish(RFC_CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(server_final, RFC_SERVER_FINAL.as_bytes());
    }

    #[test]
    fn full_exchange_with_random_nonces() {
        let salt = [1; SALT_LEN];
        let creds = ScramCredentials::derive(b"s3cret", &salt, Iterations::MIN);
        let result = exchange(&server(), "alice", b"s3cret", Some(creds)).unwrap();
        result.unwrap();
    }

    #[test]
    fn user_name_with_comma_and_equals_is_escaped() {
        let (_, client_first) = ScramClient::with_nonce("a,b=c", b"pw", "abc").unwrap();
        assert_eq!(client_first, b"n,,n=a=2Cb=3Dc,r=abc");
        let creds = ScramCredentials::derive(b"pw", b"salt", Iterations::MIN);
        let mut seen = String::new();
        exchange(&server(), "a,b=c", b"pw", Some(creds.clone()))
            .unwrap()
            .unwrap();
        server()
            .start(&client_first, |u| {
                seen = u.to_owned();
                Some(creds)
            })
            .unwrap();
        assert_eq!(seen, "a,b=c");
    }

    #[test]
    fn wrong_password_is_bad_user_name_or_password() {
        let creds = ScramCredentials::derive(b"right", b"salt", Iterations::MIN);
        let err = exchange(&server(), "alice", b"wrong", Some(creds)).unwrap_err();
        assert!(matches!(err, ScramError::InvalidProof), "{err:?}");
        assert_eq!(err.reason_code(), ReasonCode::BadUserNameOrPassword);
    }

    #[test]
    fn unknown_user_fails_like_a_wrong_password() {
        let server = server();
        let err = exchange(&server, "nobody", b"whatever", None).unwrap_err();
        assert!(matches!(err, ScramError::InvalidProof), "{err:?}");
        assert_eq!(err.reason_code(), ReasonCode::BadUserNameOrPassword);

        // The made-up salt and count are stable, so probing twice reveals nothing.
        let (_, first) = ScramClient::with_nonce("nobody", b"x", "n1").unwrap();
        let (_, a) = server.start_with_nonce(&first, |_| None, "s").unwrap();
        let (_, b) = server.start_with_nonce(&first, |_| None, "s").unwrap();
        assert_eq!(a, b);
        let a = String::from_utf8(a).unwrap();
        assert!(a.ends_with(&format!(",i={}", Iterations::DEFAULT)), "{a}");
        // ...and differ between users and between servers.
        let (_, other) = ScramClient::with_nonce("nobody2", b"x", "n1").unwrap();
        let (_, c) = server.start_with_nonce(&other, |_| None, "s").unwrap();
        assert_ne!(a.as_bytes(), c.as_slice());
        let (_, d) = ScramServer::new([8; 32])
            .start_with_nonce(&first, |_| None, "s")
            .unwrap();
        assert_ne!(a.as_bytes(), d.as_slice());
    }

    #[test]
    fn unknown_user_iteration_count_is_configurable() {
        let server = server().with_unknown_user_iterations(Iterations::new(20_000).unwrap());
        let (_, first) = ScramClient::with_nonce("nobody", b"x", "n1").unwrap();
        let (_, reply) = server.start_with_nonce(&first, |_| None, "s").unwrap();
        assert!(String::from_utf8(reply).unwrap().ends_with(",i=20000"));
    }

    #[test]
    fn tampered_server_signature_is_detected() {
        let (client, client_first) = ScramClient::new("user", b"pencil").unwrap();
        let (state, server_first) = server().start(&client_first, |_| Some(pencil())).unwrap();
        let (client, client_final) = client.handle_server_first(&server_first).unwrap();
        let server_final = state.finish(&client_final).unwrap();
        let mut signature = BASE64.decode(&server_final[2..]).unwrap();
        signature[0] ^= 1;
        let tampered = format!("v={}", BASE64.encode(signature));
        let err = client.verify_server_final(tampered.as_bytes()).unwrap_err();
        assert!(matches!(err, ScramError::InvalidServerSignature), "{err:?}");
    }

    #[test]
    fn server_that_does_not_know_the_password_cannot_sign() {
        // A server impersonator with different credentials for the user.
        let (client, client_first) = ScramClient::new("user", b"pencil").unwrap();
        let wrong = ScramCredentials::derive(b"other", b"salt", Iterations::MIN);
        let (_, server_first) = server()
            .start(&client_first, |_| Some(wrong.clone()))
            .unwrap();
        let (client, _) = client.handle_server_first(&server_first).unwrap();
        let fake = format!("v={}", BASE64.encode(hmac(wrong.server_key(), &[b"x"])));
        assert!(matches!(
            client.verify_server_final(fake.as_bytes()),
            Err(ScramError::InvalidServerSignature)
        ));
    }

    #[test]
    fn server_error_message_is_reported() {
        let (client, client_first) = ScramClient::new("user", b"pencil").unwrap();
        let (_, server_first) = server().start(&client_first, |_| Some(pencil())).unwrap();
        let (client, _) = client.handle_server_first(&server_first).unwrap();
        let err = client.verify_server_final(b"e=invalid-proof").unwrap_err();
        assert!(matches!(&err, ScramError::ServerRejected(e) if e == "invalid-proof"));
    }

    #[test]
    fn channel_binding_is_refused() {
        let err = server()
            .start(b"p=tls-server-end-point,,n=user,r=abc", |_| Some(pencil()))
            .unwrap_err();
        assert!(matches!(err, ScramError::ChannelBindingUnsupported));
        assert_eq!(err.reason_code(), ReasonCode::BadAuthenticationMethod);
    }

    #[test]
    fn y_flag_must_be_repeated_in_client_final() {
        let (state, _) = server()
            .start_with_nonce(b"y,,n=user,r=abc", |_| Some(pencil()), "xyz")
            .unwrap();
        // "biws" is base64("n,,"), not the "y,," the client sent.
        let err = state.finish(b"c=biws,r=abcxyz,p=AAAA").unwrap_err();
        assert!(matches!(err, ScramError::ChannelBindingMismatch), "{err:?}");
    }

    #[test]
    fn authzid_must_be_the_user() {
        server()
            .start(b"n,a=user,n=user,r=abc", |_| Some(pencil()))
            .unwrap();
        let err = server()
            .start(b"n,a=admin,n=user,r=abc", |_| Some(pencil()))
            .unwrap_err();
        assert!(matches!(err, ScramError::AuthzidNotSupported));
    }

    #[test]
    fn mandatory_extension_is_refused() {
        let err = server()
            .start(b"n,,m=ext,n=user,r=abc", |_| Some(pencil()))
            .unwrap_err();
        assert!(matches!(err, ScramError::MandatoryExtension));
    }

    #[test]
    fn nonce_must_continue_the_exchange() {
        let (state, _) = server()
            .start_with_nonce(b"n,,n=user,r=abc", |_| Some(pencil()), "xyz")
            .unwrap();
        let err = state.finish(b"c=biws,r=abcXXX,p=AAAA").unwrap_err();
        assert!(matches!(err, ScramError::NonceMismatch));

        let (client, _) = ScramClient::with_nonce("user", b"pencil", "abc").unwrap();
        let err = client
            .handle_server_first(b"r=zzzxyz,s=AAAA,i=4096")
            .unwrap_err();
        assert!(matches!(err, ScramError::NonceMismatch));
        let (client, _) = ScramClient::with_nonce("user", b"pencil", "abc").unwrap();
        let err = client
            .handle_server_first(b"r=abc,s=AAAA,i=4096")
            .unwrap_err();
        assert!(
            matches!(err, ScramError::NonceMismatch),
            "no server part: {err:?}"
        );
    }

    #[test]
    fn client_refuses_weak_or_huge_iteration_counts() {
        for i in ["1", "4095", "4294967295"] {
            let (client, _) = ScramClient::with_nonce("user", b"pencil", "abc").unwrap();
            let msg = format!("r=abcdef,s=AAAA,i={i}");
            let err = client.handle_server_first(msg.as_bytes()).unwrap_err();
            assert!(matches!(err, ScramError::IterationCount(_)), "{i}: {err:?}");
        }
        let (client, _) = ScramClient::with_nonce("user", b"pencil", "abc").unwrap();
        let err = client
            .handle_server_first(b"r=abcdef,s=AAAA,i=+4096")
            .unwrap_err();
        assert!(matches!(err, ScramError::Malformed(_)));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let s = server();
        for msg in [
            &b""[..],
            b"n",
            b"n,",
            b"n,,",
            b"x,,n=user,r=abc",
            b"n,,r=abc,n=user",
            b"n,,n=,r=abc",
            b"n,,n=us=er,r=abc",
            b"n,,n=user=2",
            b"n,,n=user,r=",
            b"n,,n=user,r=a b",
            b"n,,n=user,r=abc,junk",
            b"n,b=x,n=user,r=abc",
            b"n,,n=\xff,r=abc",
        ] {
            let err = s.start(msg, |_| Some(pencil())).unwrap_err();
            assert!(
                matches!(err, ScramError::Malformed(_) | ScramError::InvalidUsername),
                "{:?}: {err:?}",
                String::from_utf8_lossy(msg)
            );
            assert!(matches!(
                err.reason_code(),
                ReasonCode::ProtocolError | ReasonCode::BadUserNameOrPassword
            ));
        }
        for msg in [
            &b""[..],
            b"c=biws",
            b"c=biws,r=abcxyz",
            b"c=!!!!,r=abcxyz,p=AAAA",
            b"r=abcxyz,c=biws,p=AAAA",
            b"c=biws,r=abcxyz,p=AAAA",
            b"c=biws,r=abcxyz,p=not base64",
        ] {
            let (state, _) = s
                .start_with_nonce(b"n,,n=user,r=abc", |_| Some(pencil()), "xyz")
                .unwrap();
            let err = state.finish(msg).unwrap_err();
            assert!(
                matches!(err, ScramError::Malformed(_)),
                "{:?}: {err:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn ascii_passwords_are_not_normalised() {
        assert_eq!(normalize_password(b"pencil"), &b"pencil"[..]);
        // Controls are prohibited by SASLprep: used raw, not refused.
        assert_eq!(normalize_password(b"tab\there"), &b"tab\there"[..]);
        assert_eq!(normalize_password(b"\xff\xfe"), &b"\xff\xfe"[..]);
    }

    #[test]
    fn unicode_passwords_are_saslprepped() {
        // U+00A0 NO-BREAK SPACE maps to a space; U+2168 ROMAN NUMERAL NINE NFKC-folds to "IX".
        assert_eq!(normalize_password("a\u{a0}b".as_bytes()), &b"a b"[..]);
        assert_eq!(normalize_password("\u{2168}".as_bytes()), &b"IX"[..]);
        // So both spellings authenticate against the same stored credentials.
        let creds = ScramCredentials::derive("\u{2168}".as_bytes(), b"salt", Iterations::MIN);
        assert!(creds.verify_password(b"IX"));
        exchange(&server(), "u", b"IX", Some(creds))
            .unwrap()
            .unwrap();
    }

    #[test]
    fn iterations_bounds() {
        assert!(Iterations::new(4095).is_err());
        assert_eq!(Iterations::new(4096).unwrap(), Iterations::MIN);
        assert!(Iterations::new(10_000_001).is_err());
        assert_eq!(Iterations::default().get(), 10_000);
    }

    #[test]
    fn debug_output_hides_keys() {
        let debug = format!("{:?}", pencil());
        assert!(!debug.contains("stored_key"), "{debug}");
    }

    /// The RFC user's client keys, derived once.
    fn pencil_keys() -> &'static ClientKeys {
        static KEYS: std::sync::LazyLock<ClientKeys> = std::sync::LazyLock::new(|| {
            let salt = BASE64.decode(RFC_SALT).unwrap();
            ClientKeys::derive(b"pencil", &salt, Iterations::new(4096).unwrap())
        });
        &KEYS
    }

    /// The proof the RFC user's client computes for client-final `without_proof`, in an
    /// exchange that began with `client_first_bare` and `server_first`.
    fn proof_for(client_first_bare: &str, server_first: &[u8], without_proof: &str) -> [u8; 32] {
        let server_first = std::str::from_utf8(server_first).unwrap();
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let keys = pencil_keys();
        xor(
            &keys.client_key,
            &hmac(&keys.stored_key, &[auth_message.as_bytes()]),
        )
    }

    /// A server that has answered the RFC user's client-first with `client_nonce` and
    /// `server_nonce`; also returns client-first-bare and server-first.
    fn started(client_nonce: &str, server_nonce: &str) -> (ScramServerFirstSent, String, Vec<u8>) {
        let bare = format!("n=user,r={client_nonce}");
        let (state, server_first) = server()
            .start_with_nonce(
                format!("n,,{bare}").as_bytes(),
                |_| Some(pencil()),
                server_nonce,
            )
            .unwrap();
        (state, bare, server_first)
    }

    /// Printable nonce characters (RFC 5802: any printable ASCII but the comma).
    const NONCE: &str = "[!-+--~]{1,24}";

    proptest! {
        #[test]
        fn arbitrary_client_final_is_rejected(
            first in proptest::collection::vec(any::<u8>(), 0..128),
            last in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let s = server();
            // Client-first from anyone: whatever it starts, no proof is known for it.
            if let Ok((state, _)) = s.start(&first, |_| Some(pencil())) {
                prop_assert!(state.finish(RFC_CLIENT_FINAL.as_bytes()).is_err());
            }
            let (state, _) = s
                .start_with_nonce(b"n,,n=user,r=abc", |_| Some(pencil()), "xyz")
                .unwrap();
            let err = state.finish(&last).unwrap_err();
            prop_assert!(
                matches!(
                    err,
                    ScramError::Malformed(_)
                        | ScramError::ChannelBindingMismatch
                        | ScramError::NonceMismatch
                        | ScramError::MandatoryExtension
                        | ScramError::InvalidProof
                ),
                "{:?}: {err:?}",
                String::from_utf8_lossy(&last)
            );
        }

        #[test]
        fn near_valid_messages_are_rejected(
            prefix in "[nyp]?,?(a=[a-z=,]{0,4})?,?(n=[a-z=2CD,]{0,6})?,?(r=[!-~]{0,6})?",
            last in "(c=[a-zA-Z0-9+/=]{0,8})?,?(r=abcxyz)?,?(p=[a-zA-Z0-9+/=]{0,48})?",
        ) {
            let s = server();
            if let Ok((state, _)) = s.start(prefix.as_bytes(), |_| Some(pencil())) {
                // A client-final from another exchange proves nothing in this one.
                prop_assert!(state.finish(RFC_CLIENT_FINAL.as_bytes()).is_err());
            }
            let (state, _) = s
                .start_with_nonce(b"n,,n=user,r=abc", |_| Some(pencil()), "xyz")
                .unwrap();
            let err = state.finish(last.as_bytes()).unwrap_err();
            // A proof that decodes to 32 bytes after the right binding and nonce is wrong;
            // anything else is refused before the proof is checked.
            let wrong_proof = last
                .strip_prefix("c=biws,r=abcxyz,p=")
                .is_some_and(|p| BASE64.decode(p).is_ok_and(|p| p.len() == 32));
            if wrong_proof {
                prop_assert!(matches!(err, ScramError::InvalidProof), "{last:?}: {err:?}");
            } else {
                prop_assert!(
                    matches!(
                        err,
                        ScramError::Malformed(_)
                            | ScramError::ChannelBindingMismatch
                            | ScramError::NonceMismatch
                    ),
                    "{last:?}: {err:?}"
                );
            }
        }

        /// A valid exchange is accepted, and each single change to its client-final is
        /// refused for what it is, even with a proof computed over the changed message.
        #[test]
        fn tampered_client_final_is_rejected(
            client_nonce in NONCE,
            server_nonce in NONCE,
            bit in 0..256usize,
            nonce_edit in (any::<prop::sample::Index>(), "[!-+--~]"),
            binding in prop_oneof![
                Just(b"y,,".to_vec()),
                Just(b"p=tls-unique,,".to_vec()),
                Just(b"n,a=user,".to_vec()),
                Just(b"n,,n=user".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..16),
            ],
            cut in 0..44usize,
        ) {
            let client_final = |nonce: &str, gs2: &[u8], bare: &str, server_first: &[u8]| {
                let without_proof = format!("c={},r={nonce}", BASE64.encode(gs2));
                let proof = proof_for(bare, server_first, &without_proof);
                (without_proof, proof)
            };
            let nonce = format!("{client_nonce}{server_nonce}");

            // The valid one: accepted, and server-final carries the server's signature.
            let (state, bare, server_first) = started(&client_nonce, &server_nonce);
            let (without_proof, proof) = client_final(&nonce, b"n,,", &bare, &server_first);
            let server_final = state
                .finish(format!("{without_proof},p={}", BASE64.encode(proof)).as_bytes())
                .unwrap();
            let auth_message =
                format!("{bare},{},{without_proof}", std::str::from_utf8(&server_first).unwrap());
            let signature = hmac(&pencil_keys().server_key, &[auth_message.as_bytes()]);
            prop_assert_eq!(server_final, format!("v={}", BASE64.encode(signature)).into_bytes());

            // One bit of the proof flipped.
            let mut flipped = proof;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let (state, ..) = started(&client_nonce, &server_nonce);
            let err = state
                .finish(format!("{without_proof},p={}", BASE64.encode(flipped)).as_bytes())
                .unwrap_err();
            prop_assert!(matches!(err, ScramError::InvalidProof), "{err:?}");

            // The proof truncated.
            let encoded = BASE64.encode(proof);
            let (state, ..) = started(&client_nonce, &server_nonce);
            let err = state
                .finish(format!("{without_proof},p={}", &encoded[..cut]).as_bytes())
                .unwrap_err();
            prop_assert!(matches!(err, ScramError::Malformed("client proof")), "{err:?}");

            // A wrong nonce: one character changed, the server's part dropped, or extended.
            let (index, replacement) = nonce_edit;
            let at = index.index(nonce.len());
            let mut changed = nonce.clone();
            changed.replace_range(at..=at, &replacement);
            let wrong_nonces = [changed, client_nonce.clone(), format!("{nonce}x")];
            for wrong in wrong_nonces.iter().filter(|n| **n != nonce) {
                let (state, bare, server_first) = started(&client_nonce, &server_nonce);
                let (without_proof, proof) = client_final(wrong, b"n,,", &bare, &server_first);
                let err = state
                    .finish(format!("{without_proof},p={}", BASE64.encode(proof)).as_bytes())
                    .unwrap_err();
                prop_assert!(matches!(err, ScramError::NonceMismatch), "{wrong:?}: {err:?}");
            }

            // A channel binding other than the GS2 header client-first sent.
            if binding != b"n,," {
                let (state, bare, server_first) = started(&client_nonce, &server_nonce);
                let (without_proof, proof) = client_final(&nonce, &binding, &bare, &server_first);
                let err = state
                    .finish(format!("{without_proof},p={}", BASE64.encode(proof)).as_bytes())
                    .unwrap_err();
                prop_assert!(matches!(err, ScramError::ChannelBindingMismatch), "{err:?}");
            }
        }

        #[test]
        fn client_parser_never_panics(first in proptest::collection::vec(any::<u8>(), 0..128)) {
            let (client, _) = ScramClient::with_nonce("user", b"pencil", "abc").unwrap();
            let _ = client.handle_server_first(&first);
        }
    }
}
