//! Node identity: the Ed25519 key a node proves in every handshake, its public half (the
//! [`NodeId`] peers dial), and the key file under the data directory.
//!
//! The key file (`<data-dir>/node.key`, [`KEY_FILE`]) holds the 32-byte secret as 64 lowercase
//! hex digits and a newline. It is created on first start with mode 0600, written to a
//! temporary file, synced, then hard-linked into place: a crash leaves no half-written key,
//! and two processes starting at once end up with the same key (the second one's link fails
//! and it loads the first one's). On later starts it is loaded; a file that other users may
//! read is dealt with by [`NodeKey::load_or_create`] (see there).

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{info, warn};

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "node.key";

/// A node's public identity: its Ed25519 public key. Peers dial it and the handshake proves
/// it; shown and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) iroh::EndpointId);

impl NodeId {
    /// The 32 bytes of the public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// A public key from its 32 bytes; `None` if they are not a valid Ed25519 point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<Self> {
        iroh::EndpointId::from_bytes(bytes).ok().map(Self)
    }

    /// The first 5 bytes in hex, for logs.
    pub fn fmt_short(&self) -> String {
        self.0.fmt_short().to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// A node id that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id {0:?}: expected 64 hex digits (or 52 base32) of an Ed25519 public key")]
pub struct ParseNodeIdError(String);

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        iroh::EndpointId::from_str(s.trim())
            .map(Self)
            .map_err(|_| ParseNodeIdError(s.to_owned()))
    }
}

/// A node's secret key. It never appears in logs or `Debug` output.
#[derive(Clone)]
pub struct NodeKey(pub(crate) iroh::SecretKey);

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.id().fmt_short())
    }
}

/// Why the key file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file or its directory could not be read, created or written.
    #[error("node key {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file does not hold a key.
    #[error("node key {}: not 64 hex digits; remove it to make a new identity", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
    },
    /// Every user of the machine may read (or write) the file, so the key may be known to
    /// others: the node refuses it rather than go on with an identity it cannot trust.
    #[error(
        "node key {} has mode {mode:04o}, open to every user: the identity may be known to others; \
         remove the file to make a new identity, or chmod 600 it to keep this one",
        path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

impl NodeKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(iroh::SecretKey::generate())
    }

    /// The key of 32 secret bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(iroh::SecretKey::from_bytes(bytes))
    }

    /// The node id (public key) of this key.
    pub fn id(&self) -> NodeId {
        NodeId(self.0.public())
    }

    /// Loads the key from `path`, or creates it there (and the directory) if there is none.
    ///
    /// Permissions (Unix): the file is created with mode 0600. An existing file that its
    /// group may read or write is set to 0600, with a warning in the log; one that every
    /// user may read or write is refused ([`KeyError::Exposed`]): that key may be known to
    /// others, and only the operator can decide to keep it.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io_err = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                check_mode(path)?;
                let key = parse(&bytes).ok_or_else(|| KeyError::Invalid {
                    path: path.to_owned(),
                })?;
                info!(path = %path.display(), node_id = %key.id(), "loaded node key");
                Ok(key)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io_err)?;
                }
                let key = Self::generate();
                match write_new(path, &key).map_err(io_err)? {
                    Written::Created => {
                        info!(path = %path.display(), node_id = %key.id(), "created node key");
                        Ok(key)
                    }
                    // Another process made it first: use theirs, so both agree.
                    Written::Exists => Self::load_or_create(path),
                }
            }
            Err(e) => Err(io_err(e)),
        }
    }
}

/// The key from the file's contents: 64 hex digits, surrounding white space ignored.
fn parse(bytes: &[u8]) -> Option<NodeKey> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    iroh::SecretKey::from_str(&text.to_ascii_lowercase())
        .ok()
        .map(NodeKey)
}

fn encode(key: &NodeKey) -> String {
    let mut text = String::with_capacity(65);
    for b in key.0.to_bytes() {
        text.push_str(&format!("{b:02x}"));
    }
    text.push('\n');
    text
}

enum Written {
    Created,
    Exists,
}

/// Writes `key` to a temporary file of mode 0600 next to `path`, syncs it, and links it to
/// `path` unless a file is already there.
fn write_new(path: &Path, key: &NodeKey) -> io::Result<Written> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    // A name no other writer uses, in this process or another; one left by a crash is
    // skipped (and stays, harmless, until removed).
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        attempts += 1;
        let mut tmp_name = name.to_owned();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        tmp_name.push(format!(".tmp-{}-{n}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        match create_private(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => continue,
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        file.write_all(encode(key).as_bytes())?;
        file.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(Written::Created),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Written::Exists),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    if matches!(result, Ok(Written::Created)) {
        sync_dir(path);
    }
    result
}

#[cfg(unix)]
fn create_private(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Makes the new directory entry durable; best effort (not every platform can open a
/// directory).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
}

#[cfg(unix)]
fn check_mode(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let io_err = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(io_err)?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o007 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    if mode & 0o070 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        warn!(
            path = %path.display(),
            old_mode = %format!("{mode:04o}"),
            "node key was open to its group; changed its mode to 0600"
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path) -> Result<(), KeyError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_round_trip_as_hex() {
        let id = NodeKey::generate().id();
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert!("nope".parse::<NodeId>().is_err());
        assert_eq!(NodeId::from_bytes(id.as_bytes()), Some(id));
    }

    #[test]
    fn writers_racing_to_create_the_key_agree_on_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let ids: Vec<NodeId> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| NodeKey::load_or_create(&path).unwrap().id()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(NodeKey::load_or_create(&path).unwrap().id(), ids[0]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn key_text_round_trips_and_rejects_garbage() {
        let key = NodeKey::generate();
        let text = encode(&key);
        assert_eq!(parse(text.as_bytes()).unwrap().id(), key.id());
        assert_eq!(
            parse(text.to_uppercase().as_bytes()).unwrap().id(),
            key.id()
        );
        assert!(parse(b"").is_none());
        assert!(parse(&text.as_bytes()[..40]).is_none());
        assert!(parse("zz".repeat(32).as_bytes()).is_none());
        assert!(!format!("{key:?}").contains(text.trim()));
    }
}
