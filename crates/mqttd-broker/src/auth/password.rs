//! The password file, mqttd's equivalent of Mosquitto's `password_file`.
//!
//! One `user:hash` per line; lines starting with `#` and blank lines are comments, kept in
//! place when the file is saved again. Surrounding spaces and tabs around the user name and
//! the hash are ignored, as Mosquitto ignores them. Three hash formats are understood:
//!
//! - `$scram-sha-256$<iterations>$<b64 salt>$<b64 StoredKey>$<b64 ServerKey>`: what mqttd
//!   writes. It holds SCRAM-SHA-256 credentials (RFC 5802/7677), so one entry serves both a
//!   plain user name/password CONNECT and SCRAM enhanced authentication. The iteration count
//!   must lie within [`Iterations::MIN`]..=[`Iterations::MAX`].
//! - `$7$<iterations>$<b64 salt>$<b64 hash>`: Mosquitto 2's PBKDF2-HMAC-SHA512 (a 12- or
//!   64-byte salt, a 64-byte hash), as written by `mosquitto_passwd`. Verified, never written.
//! - `$6$<b64 salt>$<b64 hash>`: Mosquitto 1.x's salted SHA-512, `SHA512(password || salt)`.
//!   Verified, never written.
//!
//! The Mosquitto formats cannot serve SCRAM: those users log in with a plain password until
//! their password is set again with [`PasswordFile::set_password`].
//!
//! Unlike Mosquitto, which logs and drops a malformed entry, loading fails on the first bad
//! line, naming the file and the line: a credential file that does not say what its author
//! meant should stop the broker, not silently lock a user out or leave a stale entry.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

use super::scram::{Iterations, IterationsError, ScramCredentials};
use super::{FileError, FileKind};

const SCRAM_PREFIX: &str = "$scram-sha-256$";
const PBKDF2_SHA512_PREFIX: &str = "$7$";
const SHA512_PREFIX: &str = "$6$";
/// Mosquitto's `SALT_LEN`; Mosquitto 2.1 also accepts 64-byte salts for `$7$`.
const MOSQUITTO_SALT_LENS: [usize; 2] = [12, 64];
const SHA512_LEN: usize = 64;

/// The hash formats an entry can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HashScheme {
    /// `$scram-sha-256$`: usable for plain and SCRAM authentication.
    ScramSha256,
    /// Mosquitto 2's `$7$` PBKDF2-HMAC-SHA512.
    MosquittoPbkdf2Sha512,
    /// Mosquitto 1.x's `$6$` salted SHA-512.
    MosquittoSha512,
}

/// The password file, in memory.
#[derive(Clone, Default)]
pub struct PasswordFile {
    lines: Vec<Line>,
    /// User name to index in `lines`.
    index: HashMap<String, usize>,
}

#[derive(Clone)]
enum Line {
    /// A comment or blank line, written back as it was.
    Verbatim(String),
    Entry {
        user: String,
        hash: PasswordHash,
    },
}

#[derive(Clone)]
enum PasswordHash {
    Scram(ScramCredentials),
    Pbkdf2Sha512 {
        iterations: NonZeroU32,
        salt: Box<[u8]>,
        hash: [u8; SHA512_LEN],
    },
    Sha512 {
        salt: Box<[u8]>,
        hash: [u8; SHA512_LEN],
    },
}

impl PasswordHash {
    fn scheme(&self) -> HashScheme {
        match self {
            Self::Scram(_) => HashScheme::ScramSha256,
            Self::Pbkdf2Sha512 { .. } => HashScheme::MosquittoPbkdf2Sha512,
            Self::Sha512 { .. } => HashScheme::MosquittoSha512,
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Self::Scram(credentials) => credentials.verify_password(password),
            Self::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut computed = [0; SHA512_LEN];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations.get(), &mut computed);
                computed.ct_eq(hash).into()
            }
            Self::Sha512 { salt, hash } => {
                let computed = Sha512::new()
                    .chain_update(password)
                    .chain_update(salt)
                    .finalize();
                computed.as_slice().ct_eq(hash.as_slice()).into()
            }
        }
    }

    fn parse(text: &str) -> Result<Self, PasswordLineError> {
        if let Some(rest) = text.strip_prefix(SCRAM_PREFIX) {
            let [iterations, salt, stored_key, server_key] = fields(rest)?;
            let iterations = parse_count(iterations)?;
            let iterations = Iterations::new(iterations).map_err(PasswordLineError::Iterations)?;
            let salt = decode(salt, "salt")?;
            if salt.is_empty() {
                return Err(PasswordLineError::Length {
                    field: "salt",
                    len: 0,
                });
            }
            let stored_key = decode_array(stored_key, "StoredKey")?;
            let server_key = decode_array(server_key, "ServerKey")?;
            Ok(Self::Scram(ScramCredentials::from_parts(
                iterations, salt, stored_key, server_key,
            )))
        } else if let Some(rest) = text.strip_prefix(PBKDF2_SHA512_PREFIX) {
            let [iterations, salt, hash] = fields(rest)?;
            let iterations = NonZeroU32::new(parse_count(iterations)?)
                .ok_or(PasswordLineError::ZeroIterations)?;
            Ok(Self::Pbkdf2Sha512 {
                iterations,
                salt: mosquitto_salt(salt)?,
                hash: decode_array(hash, "hash")?,
            })
        } else if let Some(rest) = text.strip_prefix(SHA512_PREFIX) {
            let [salt, hash] = fields(rest)?;
            Ok(Self::Sha512 {
                salt: mosquitto_salt(salt)?,
                hash: decode_array(hash, "hash")?,
            })
        } else if text.starts_with('$') {
            Err(PasswordLineError::UnknownScheme)
        } else {
            // Mosquitto built without TLS accepted plaintext; we never do.
            Err(PasswordLineError::Plaintext)
        }
    }
}

impl fmt::Display for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Scram(c) => write!(
                f,
                "{SCRAM_PREFIX}{}${}${}${}",
                c.iterations(),
                BASE64.encode(c.salt()),
                BASE64.encode(c.stored_key()),
                BASE64.encode(c.server_key())
            ),
            Self::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => write!(
                f,
                "{PBKDF2_SHA512_PREFIX}{iterations}${}${}",
                BASE64.encode(salt),
                BASE64.encode(hash)
            ),
            Self::Sha512 { salt, hash } => write!(
                f,
                "{SHA512_PREFIX}{}${}",
                BASE64.encode(salt),
                BASE64.encode(hash)
            ),
        }
    }
}

/// Splits the `$`-separated fields after a scheme prefix; exactly `N` are expected.
fn fields<const N: usize>(rest: &str) -> Result<[&str; N], PasswordLineError> {
    let parts: Vec<&str> = rest.split('$').collect();
    let found = parts.len();
    parts
        .try_into()
        .map_err(|_| PasswordLineError::FieldCount { expected: N, found })
}

fn parse_count(text: &str) -> Result<u32, PasswordLineError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PasswordLineError::InvalidIterations);
    }
    text.parse()
        .map_err(|_| PasswordLineError::InvalidIterations)
}

fn decode(text: &str, field: &'static str) -> Result<Vec<u8>, PasswordLineError> {
    BASE64
        .decode(text)
        .map_err(|_| PasswordLineError::Base64 { field })
}

fn decode_array<const N: usize>(
    text: &str,
    field: &'static str,
) -> Result<[u8; N], PasswordLineError> {
    let bytes = decode(text, field)?;
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| PasswordLineError::Length { field, len })
}

fn mosquitto_salt(text: &str) -> Result<Box<[u8]>, PasswordLineError> {
    let salt = decode(text, "salt")?;
    if !MOSQUITTO_SALT_LENS.contains(&salt.len()) {
        return Err(PasswordLineError::Length {
            field: "salt",
            len: salt.len(),
        });
    }
    Ok(salt.into())
}

impl PasswordFile {
    /// An empty password file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads and parses the file at `path`. Errors name the path, and the line if the content
    /// is at fault.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, PasswordFileError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| PasswordFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| e.with_path(path))
    }

    /// Parses the content of a password file. Errors carry the line number.
    pub fn parse(text: &str) -> Result<Self, PasswordFileError> {
        let mut file = Self::new();
        for (number, raw) in text.lines().enumerate() {
            let line = number + 1;
            let error = |error| PasswordFileError::Line {
                path: None,
                line,
                error,
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                file.lines.push(Line::Verbatim(raw.to_owned()));
                continue;
            }
            let (user, hash) = trimmed
                .split_once(':')
                .ok_or(error(PasswordLineError::MissingSeparator))?;
            let user = user.trim_matches([' ', '\t']);
            if user.is_empty() {
                return Err(error(PasswordLineError::EmptyUsername));
            }
            if let Some(&first) = file.index.get(user) {
                let first_line = file.line_number_of(first);
                return Err(error(PasswordLineError::DuplicateUser { first_line }));
            }
            let hash = PasswordHash::parse(hash.trim_matches([' ', '\t'])).map_err(error)?;
            file.index.insert(user.to_owned(), file.lines.len());
            file.lines.push(Line::Entry {
                user: user.to_owned(),
                hash,
            });
        }
        Ok(file)
    }

    /// The 1-based line number `lines[i]` came from while parsing.
    fn line_number_of(&self, i: usize) -> usize {
        i + 1
    }

    /// Whether `password` is `user`'s password. An unknown user costs about the same time as
    /// a known one (one PBKDF2 run at the file's usual iteration count) and yields `false`.
    ///
    /// Passwords of `$scram-sha-256$` entries are normalised as SCRAM normalises them
    /// ([`normalize_password`](super::scram::normalize_password)); Mosquitto entries compare
    /// the raw bytes, as Mosquitto does.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.hash(user) {
            Some(hash) => hash.verify(password),
            None => {
                let decoy = ScramCredentials::from_parts(
                    self.usual_iterations(),
                    [0; super::scram::SALT_LEN],
                    [0; 32],
                    [0; 32],
                );
                // black_box: the result is unused, and the work is the point.
                std::hint::black_box(decoy.verify_password(std::hint::black_box(password)));
                false
            }
        }
    }

    /// The SCRAM credentials of `user`, if the user exists and has a `$scram-sha-256$` hash.
    pub fn scram_credentials(&self, user: &str) -> Option<&ScramCredentials> {
        match self.hash(user)? {
            PasswordHash::Scram(credentials) => Some(credentials),
            _ => None,
        }
    }

    /// The hash format of `user`'s entry.
    pub fn scheme(&self, user: &str) -> Option<HashScheme> {
        self.hash(user).map(PasswordHash::scheme)
    }

    /// Whether `user` has an entry.
    pub fn contains(&self, user: &str) -> bool {
        self.index.contains_key(user)
    }

    /// The users, in file order.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().filter_map(|line| match line {
            Line::Entry { user, .. } => Some(user.as_str()),
            Line::Verbatim(_) => None,
        })
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Sets `user`'s password, adding the user if needed, as SCRAM-SHA-256 credentials with a
    /// fresh random salt. An existing entry keeps its place in the file.
    pub fn set_password(
        &mut self,
        user: &str,
        password: &[u8],
        iterations: Iterations,
    ) -> Result<(), SetPasswordError> {
        validate_username(user)?;
        let credentials =
            ScramCredentials::generate(password, iterations).map_err(SetPasswordError::Random)?;
        let hash = PasswordHash::Scram(credentials);
        match self.index.get(user) {
            Some(&i) => {
                if let Some(Line::Entry { hash: old, .. }) = self.lines.get_mut(i) {
                    *old = hash;
                }
            }
            None => {
                self.index.insert(user.to_owned(), self.lines.len());
                self.lines.push(Line::Entry {
                    user: user.to_owned(),
                    hash,
                });
            }
        }
        Ok(())
    }

    /// Removes `user`; returns whether the user existed.
    pub fn remove(&mut self, user: &str) -> bool {
        let Some(i) = self.index.remove(user) else {
            return false;
        };
        self.lines.remove(i);
        for slot in self.index.values_mut() {
            if *slot > i {
                *slot -= 1;
            }
        }
        true
    }

    /// Writes the file to `path` atomically: the content goes to a temporary file in the same
    /// directory (mode 0600 on Unix), is synced, and replaces `path` by a rename, so a reader
    /// sees the old file or the new one, never a mix.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), SaveError> {
        let path = path.as_ref();
        let error = |source| SaveError {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| error(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix).map_err(|e| error(io::Error::other(e)))?;
        let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{suffix}.tmp"));
        let tmp = dir.join(tmp_name);

        let result =
            write_new_file(&tmp, self.render().as_bytes()).and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = result {
            // Best effort: the temporary file is garbage whether or not this succeeds.
            let _ = fs::remove_file(&tmp);
            return Err(error(e));
        }
        sync_dir(dir);
        Ok(())
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::Verbatim(text) => out.push_str(text),
                Line::Entry { user, hash } => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(&hash.to_string());
                }
            }
            out.push('\n');
        }
        out
    }

    fn hash(&self, user: &str) -> Option<&PasswordHash> {
        match self.lines.get(*self.index.get(user)?)? {
            Line::Entry { hash, .. } => Some(hash),
            Line::Verbatim(_) => None,
        }
    }

    /// The iteration count of the first SCRAM entry, or the default: the decoy for unknown
    /// users should cost what a real check usually costs.
    fn usual_iterations(&self) -> Iterations {
        self.lines
            .iter()
            .find_map(|line| match line {
                Line::Entry {
                    hash: PasswordHash::Scram(c),
                    ..
                } => Some(c.iterations()),
                _ => None,
            })
            .unwrap_or_default()
    }
}

impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile")
            .field("users", &self.users().collect::<Vec<_>>())
            .finish()
    }
}

fn validate_username(user: &str) -> Result<(), SetPasswordError> {
    let error = |reason| Err(SetPasswordError::InvalidUsername { reason });
    if user.is_empty() {
        return error("it is empty");
    }
    if user.contains(':') {
        return error("it contains ':'");
    }
    if user.chars().any(char::is_control) {
        return error("it contains a control character");
    }
    if user.trim() != user {
        return error("it starts or ends with white space");
    }
    if user.starts_with('#') {
        return error("it starts with '#', which makes the line a comment");
    }
    if user.len() > usize::from(u16::MAX) {
        return error("it is longer than 65535 bytes");
    }
    Ok(())
}

fn write_new_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

/// Makes the rename durable. Best effort: not every platform can open a directory.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Why a password file could not be loaded or parsed.
pub type PasswordFileError = FileError<PasswordLineError>;

impl FileKind for PasswordLineError {
    const NAME: &'static str = "password file";
}

/// What is wrong with one line of a password file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PasswordLineError {
    /// The line has no `:` between user name and hash.
    #[error("expected 'user:hash'")]
    MissingSeparator,
    /// The user name is empty.
    #[error("empty user name")]
    EmptyUsername,
    /// The user already has an entry.
    #[error("duplicate user, first defined on line {first_line}")]
    DuplicateUser {
        /// Where the first entry is.
        first_line: usize,
    },
    /// The hash does not start with `$scram-sha-256$`, `$7$` or `$6$`.
    #[error("unknown hash scheme (expected $scram-sha-256$, $7$ or $6$)")]
    UnknownScheme,
    /// The entry holds what looks like a plaintext password.
    #[error("plaintext password; hash it with `mqttd passwd` (or `mosquitto_passwd -U`)")]
    Plaintext,
    /// The hash has the wrong number of `$`-separated fields.
    #[error("expected {expected} '$'-separated fields after the scheme, found {found}")]
    FieldCount {
        /// How many the scheme has.
        expected: usize,
        /// How many there are.
        found: usize,
    },
    /// The iteration count is not a decimal number.
    #[error("iteration count is not a number")]
    InvalidIterations,
    /// A Mosquitto iteration count of zero.
    #[error("iteration count must be at least 1")]
    ZeroIterations,
    /// A SCRAM iteration count outside the accepted range.
    #[error(transparent)]
    Iterations(IterationsError),
    /// A field is not valid (padded, standard alphabet) base64.
    #[error("{field} is not valid base64")]
    Base64 {
        /// Which field.
        field: &'static str,
    },
    /// A field decodes to the wrong number of bytes.
    #[error("{field} has the wrong length ({len} bytes)")]
    Length {
        /// Which field.
        field: &'static str,
        /// Its decoded length.
        len: usize,
    },
}

/// Why [`PasswordFile::set_password`] refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetPasswordError {
    /// The user name cannot be stored in the file.
    #[error("invalid user name: {reason}")]
    InvalidUsername {
        /// Why.
        reason: &'static str,
    },
    /// No random salt could be drawn.
    #[error("random number generator failed: {0}")]
    Random(getrandom::Error),
}

/// Why [`PasswordFile::save`] failed; the file at `path` is unchanged.
#[derive(Debug, thiserror::Error)]
#[error("cannot write password file {}: {source}", path.display())]
pub struct SaveError {
    /// The file that was to be written.
    pub path: PathBuf,
    /// The underlying error.
    pub source: io::Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated by Mosquitto 2.0.11: `mosquitto_passwd -b -c pw user secret`, then
    /// `mosquitto_passwd -b pw "bob smith" pässwörd` and `mosquitto_passwd -H sha512 -b pw old
    /// secret6`.
    const MOSQUITTO_FILE: &str = "\
user:$7$101$Ya3m2TWGUpE5VB/h$xHaMql7NOAJsda87dVvwoTqsMPfPtoKTb2JMSYXKLrWMwdzKRJBsYKtIr3g1P6ZTULUF3VFUBv6foFtjBEI2lQ==
bob smith:$7$101$mJNw+bhNPZgdJxbp$lFJlO58MuSk3oZOHkhj2hz/+xb8+iNuyTudu+U5X9uEKMiKVMc7GtCiqpHOYp5o02g6FWyyGc5COI6Zwal9qiw==
old:$6$LL0mShQGm+RHcIWx$FmESxSAG5saZu+HIWyyGjqPirYh6UOEol1mlP8UqZlU6qVVGfF44oCHp0/KBRdDT++mvCoT9FxIZi8Vm4lgo9Q==
";

    fn fast() -> Iterations {
        Iterations::MIN
    }

    #[test]
    fn mosquitto_pbkdf2_sha512_entries_verify() {
        let file = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
        assert_eq!(file.len(), 3);
        assert!(file.verify("user", b"secret"));
        assert!(!file.verify("user", b"Secret"));
        assert!(!file.verify("user", b""));
        assert!(file.verify("bob smith", "pässwörd".as_bytes()));
        assert!(!file.verify("bob smith", b"passwort"));
        assert_eq!(file.scheme("user"), Some(HashScheme::MosquittoPbkdf2Sha512));
        // Mosquitto hashes cannot drive SCRAM.
        assert!(file.scram_credentials("user").is_none());
    }

    #[test]
    fn mosquitto_sha512_entries_verify() {
        let file = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
        assert!(file.verify("old", b"secret6"));
        assert!(!file.verify("old", b"secret"));
        assert_eq!(file.scheme("old"), Some(HashScheme::MosquittoSha512));
    }

    #[test]
    fn mosquitto_entries_are_written_back_unchanged() {
        let file = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
        assert_eq!(file.render(), MOSQUITTO_FILE);
    }

    #[test]
    fn set_save_load_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut file = PasswordFile::parse("# users\n\n").unwrap();
        file.set_password("alice", b"wonderland", fast()).unwrap();
        file.set_password("bob", b"builder", fast()).unwrap();
        file.save(&path).unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# users\n\nalice:$scram-sha-256$4096$"),
            "{text}"
        );
        let loaded = PasswordFile::load(&path).unwrap();
        assert!(loaded.verify("alice", b"wonderland"));
        assert!(loaded.verify("bob", b"builder"));
        assert!(!loaded.verify("alice", b"builder"));
        assert!(!loaded.verify("carol", b"wonderland"));
        assert_eq!(loaded.users().collect::<Vec<_>>(), ["alice", "bob"]);
        assert_eq!(
            loaded.scram_credentials("alice"),
            file.scram_credentials("alice")
        );
        assert_eq!(loaded.render(), text);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Only the file itself is left behind, no temporary.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn set_password_replaces_in_place_and_remove_reindexes() {
        let mut file = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
        file.set_password("user", b"new", fast()).unwrap();
        assert!(file.verify("user", b"new"));
        assert!(!file.verify("user", b"secret"));
        assert_eq!(file.scheme("user"), Some(HashScheme::ScramSha256));
        assert_eq!(file.users().next(), Some("user"));

        assert!(file.remove("bob smith"));
        assert!(!file.remove("bob smith"));
        assert!(!file.contains("bob smith"));
        assert!(file.verify("old", b"secret6"));
        assert!(file.verify("user", b"new"));
        assert_eq!(file.len(), 2);
    }

    #[test]
    fn salts_are_random() {
        let mut file = PasswordFile::new();
        file.set_password("a", b"same", fast()).unwrap();
        file.set_password("b", b"same", fast()).unwrap();
        assert_ne!(
            file.scram_credentials("a").unwrap().salt(),
            file.scram_credentials("b").unwrap().salt()
        );
    }

    #[test]
    fn mosquitto_entries_cannot_do_scram() {
        use super::super::scram::{ScramClient, ScramError, ScramServer};
        let file = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
        let server = ScramServer::new([1; 32]);
        let (client, first) = ScramClient::new("user", b"secret").unwrap();
        let (state, server_first) = server
            .start(&first, |u| file.scram_credentials(u).cloned())
            .unwrap();
        let (_, last) = client.handle_server_first(&server_first).unwrap();
        assert!(matches!(state.finish(&last), Err(ScramError::InvalidProof)));
    }

    #[test]
    fn scram_entries_feed_the_scram_server() {
        use super::super::scram::{ScramClient, ScramServer};
        let mut file = PasswordFile::new();
        file.set_password("alice", b"wonderland", fast()).unwrap();
        let server = ScramServer::new([1; 32]);
        let (client, first) = ScramClient::new("alice", b"wonderland").unwrap();
        let (state, server_first) = server
            .start(&first, |u| file.scram_credentials(u).cloned())
            .unwrap();
        let (client, last) = client.handle_server_first(&server_first).unwrap();
        let server_final = state.finish(&last).unwrap();
        client.verify_server_final(&server_final).unwrap();
    }

    #[test]
    fn invalid_user_names_are_refused() {
        let mut file = PasswordFile::new();
        for user in ["", "a:b", "a\nb", " a", "a ", "#a"] {
            let err = file.set_password(user, b"pw", fast()).unwrap_err();
            assert!(
                matches!(err, SetPasswordError::InvalidUsername { .. }),
                "{user:?}"
            );
        }
        assert!(file.is_empty());
    }

    #[test]
    fn whitespace_and_comments_are_handled_like_mosquitto() {
        let text = "  # indented comment\n\t\n  user : $6$LL0mShQGm+RHcIWx$FmESxSAG5saZu+HIWyyGjqPirYh6UOEol1mlP8UqZlU6qVVGfF44oCHp0/KBRdDT++mvCoT9FxIZi8Vm4lgo9Q==  \r\n";
        let file = PasswordFile::parse(text).unwrap();
        assert!(file.verify("user", b"secret6"));
    }

    #[test]
    fn parse_errors_name_the_line() {
        let cases: &[(&str, PasswordLineError)] = &[
            ("# c\nnocolon\n", PasswordLineError::MissingSeparator),
            (":$6$x$y\n", PasswordLineError::EmptyUsername),
            ("a:plain\n", PasswordLineError::Plaintext),
            ("a:$argon2id$v=19$x\n", PasswordLineError::UnknownScheme),
            (
                "a:$7$101$Ya3m2TWGUpE5VB/h\n",
                PasswordLineError::FieldCount {
                    expected: 3,
                    found: 2,
                },
            ),
            (
                "a:$7$x$Ya3m2TWGUpE5VB/h$AA==\n",
                PasswordLineError::InvalidIterations,
            ),
            (
                "a:$7$0$Ya3m2TWGUpE5VB/h$AA==\n",
                PasswordLineError::ZeroIterations,
            ),
            (
                "a:$7$101$Ya3m2TWGUpE5VB/h$AA==\n",
                PasswordLineError::Length {
                    field: "hash",
                    len: 1,
                },
            ),
            (
                "a:$6$AAAA$AA==\n",
                PasswordLineError::Length {
                    field: "salt",
                    len: 3,
                },
            ),
            (
                "a:$6$!!!!$AA==\n",
                PasswordLineError::Base64 { field: "salt" },
            ),
            (
                "a:$scram-sha-256$100$AAAA$AA==$AA==\n",
                PasswordLineError::Iterations(IterationsError(100)),
            ),
        ];
        for (text, expected) in cases {
            let err = PasswordFile::parse(text).unwrap_err();
            let line = if text.starts_with('#') { 2 } else { 1 };
            match &err {
                PasswordFileError::Line {
                    path: None,
                    line: l,
                    error,
                } => {
                    assert_eq!(error, expected, "{text:?}");
                    assert_eq!(*l, line, "{text:?}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
            assert!(
                err.to_string().starts_with(&format!("line {line}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn duplicate_users_are_refused() {
        let text = format!("{MOSQUITTO_FILE}\nuser:$6$LL0mShQGm+RHcIWx$FmESxSAG5saZu+HIWyyGjqPirYh6UOEol1mlP8UqZlU6qVVGfF44oCHp0/KBRdDT++mvCoT9FxIZi8Vm4lgo9Q==\n");
        let err = PasswordFile::parse(&text).unwrap_err();
        assert!(
            matches!(
                err,
                PasswordFileError::Line {
                    line: 5,
                    error: PasswordLineError::DuplicateUser { first_line: 1 },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn load_errors_name_the_path_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        fs::write(&path, "# header\nalice:$7$101$bad\n").unwrap();
        let err = PasswordFile::load(&path).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{}:2: ", path.display())),
            "{message}"
        );

        let missing = dir.path().join("missing");
        let err = PasswordFile::load(&missing).unwrap_err();
        assert!(matches!(&err, PasswordFileError::Io { path, .. } if *path == missing));
        assert!(err.to_string().contains(&missing.display().to_string()));
    }

    #[test]
    fn save_failure_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = PasswordFile::parse(MOSQUITTO_FILE).unwrap();
        // A directory where the file should be: the rename fails.
        let target = dir.path().join("passwd");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), "x").unwrap();
        let err = file.save(&target).unwrap_err();
        assert_eq!(err.path, target);
        assert!(target.join("keep").exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file removed"
        );
    }
}
