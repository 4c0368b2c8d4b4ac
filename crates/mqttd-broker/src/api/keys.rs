//! API keys: created by `mqttd api-key create NAME`, printed once, stored hashed.
//!
//! A key is 32 random bytes, shown as `mqttd_` and 43 characters of URL-safe base64. Keys
//! are high-entropy, so a plain SHA-256 of the key is enough to store (a slow password hash
//! protects guessable secrets; nobody guesses 256 random bits). The file
//! (`<data_dir>/api-keys`, mode 0600) holds one line per key, `NAME SHA256-HEX CREATED`, and
//! never the key itself. The broker reads it again when it changes, so a key created while
//! the broker runs works at once.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The file in the data directory holding the keys' hashes.
pub const KEY_FILE: &str = "api-keys";

/// What every key starts with, so that a leaked one is recognisable (secret scanners).
const PREFIX: &str = "mqttd_";

/// Why a key could not be created or the key file read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The name is empty, too long, or has characters other than letters, digits, `-`, `_`
    /// and `.`.
    #[error("invalid key name {0:?}: use 1-64 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    /// A key of this name exists already.
    #[error("an API key named {0:?} exists already")]
    Exists(String),
    /// A line of the key file does not parse.
    #[error("{path}: line {line} is not `NAME SHA256-HEX CREATED`")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its line, from 1.
        line: usize,
    },
    /// The file could not be read or written, or no random bytes were available.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One stored key: its name and hash, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The name given at creation.
    pub name: String,
    /// SHA-256 of the key.
    hash: [u8; 32],
    /// When it was created, in seconds since the Unix epoch.
    pub created: u64,
}

/// The key file of a data directory.
#[derive(Debug)]
pub struct KeyStore {
    path: PathBuf,
    cache: Mutex<KeyCache>,
}

/// The keys as last read.
#[derive(Debug, Default)]
struct KeyCache {
    /// The file's modification time and length then (`None`: no file).
    seen: Option<(SystemTime, u64)>,
    keys: Vec<StoredKey>,
}

impl KeyStore {
    /// The key file of `data_dir`; nothing is read yet.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(KEY_FILE),
            cache: Mutex::default(),
        }
    }

    /// Where the hashes are stored.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the key file exists (it does once a key was created).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Creates a key named `name`, stores its hash and returns the key: the only time it is
    /// ever seen.
    pub fn create(&self, name: &str) -> Result<String, KeyError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(KeyError::InvalidName(name.to_owned()));
        }
        let mut keys = self.read()?;
        if keys.iter().any(|k| k.name == name) {
            return Err(KeyError::Exists(name.to_owned()));
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| self.io(std::io::Error::other(e)))?;
        let key = format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        keys.push(StoredKey {
            name: name.to_owned(),
            hash: Sha256::digest(key.as_bytes()).into(),
            created,
        });
        self.write(&keys)?;
        Ok(key)
    }

    /// The keys stored (names and creation times; their hashes stay inside).
    pub fn list(&self) -> Result<Vec<StoredKey>, KeyError> {
        self.read()
    }

    /// Removes the key named `name`; returns whether there was one.
    pub fn revoke(&self, name: &str) -> Result<bool, KeyError> {
        let mut keys = self.read()?;
        let before = keys.len();
        keys.retain(|k| k.name != name);
        if keys.len() == before {
            return Ok(false);
        }
        self.write(&keys)?;
        Ok(true)
    }

    /// The name of the key `presented` is, if it is one. The file is read again if it changed
    /// since the last look; an unreadable file matches no key (and is logged).
    pub fn verify(&self, presented: &str) -> Option<String> {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut cache = self.cache.lock();
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok();
        if modified != cache.seen || modified.is_none() {
            *cache = match self.read() {
                Ok(keys) => KeyCache {
                    seen: modified,
                    keys,
                },
                Err(error) => {
                    tracing::warn!(%error, "cannot read the API keys");
                    KeyCache::default()
                }
            };
        }
        // Every stored hash is compared, in constant time, whichever matches.
        let mut found = None;
        for key in &cache.keys {
            if bool::from(key.hash.ct_eq(&hash)) {
                found = Some(key.name.clone());
            }
        }
        found
    }

    fn io(&self, source: std::io::Error) -> KeyError {
        KeyError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn read(&self) -> Result<Vec<StoredKey>, KeyError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = || KeyError::Malformed {
                path: self.path.clone(),
                line: i + 1,
            };
            let mut fields = line.split_whitespace();
            let (Some(name), Some(hex), Some(created), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return Err(malformed());
            };
            let hash = parse_hex(hex).ok_or_else(malformed)?;
            let created = created.parse().map_err(|_| malformed())?;
            keys.push(StoredKey {
                name: name.to_owned(),
                hash,
                created,
            });
        }
        Ok(keys)
    }

    /// Replaces the file: written to a temporary file (mode 0600 from its creation) and
    /// renamed over it, so that a reader never sees half of it.
    fn write(&self, keys: &[StoredKey]) -> Result<(), KeyError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        let mut text = String::from("# mqttd API keys: NAME SHA256-HEX CREATED (unix seconds)\n");
        for key in keys {
            let hex: String = key.hash.iter().map(|b| format!("{b:02x}")).collect();
            text.push_str(&format!("{} {hex} {}\n", key.name, key.created));
        }
        let tmp = self.path.with_extension("tmp");
        crate::write_private(&tmp, text.as_bytes()).map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))
    }
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let s = std::str::from_utf8(pair).ok()?;
        *o = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_verifies_and_is_stored_only_hashed_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        assert!(!store.exists());
        let key = store.create("admin").unwrap();
        assert!(key.starts_with(PREFIX) && key.len() == PREFIX.len() + 43);
        assert_eq!(store.verify(&key).as_deref(), Some("admin"));
        assert_eq!(store.verify("mqttd_wrong"), None);
        assert_eq!(store.verify(""), None);
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(&key) && !text.contains(&key[PREFIX.len()..]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn keys_have_unique_valid_names_and_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        let a = store.create("a").unwrap();
        let b = store.create("ops.b-1").unwrap();
        assert_ne!(a, b);
        assert!(matches!(store.create("a"), Err(KeyError::Exists(_))));
        for bad in ["", "has space", "x/y", &"n".repeat(65)] {
            assert!(matches!(store.create(bad), Err(KeyError::InvalidName(_))));
        }
        let names: Vec<_> = store.list().unwrap().into_iter().map(|k| k.name).collect();
        assert_eq!(names, ["a", "ops.b-1"]);
        assert!(store.revoke("a").unwrap());
        assert!(!store.revoke("a").unwrap());
        assert_eq!(store.verify(&a), None);
        assert_eq!(store.verify(&b).as_deref(), Some("ops.b-1"));
    }

    #[test]
    fn a_key_created_by_another_process_is_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let broker = KeyStore::new(dir.path());
        assert_eq!(broker.verify("mqttd_x"), None);
        let key = KeyStore::new(dir.path()).create("late").unwrap();
        assert_eq!(broker.verify(&key).as_deref(), Some("late"));
    }

    #[test]
    fn a_malformed_file_names_its_line_and_matches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path());
        std::fs::write(store.path(), "# comment\n\nadmin nothex 1\n").unwrap();
        assert!(matches!(
            store.list(),
            Err(KeyError::Malformed { line: 3, .. })
        ));
        assert_eq!(store.verify("anything"), None);
    }
}
