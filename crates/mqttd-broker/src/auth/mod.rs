//! Authentication and authorization: who a client is, and what it may do.
//!
//! Everything here is synchronous and pure; the only I/O is the explicit `load` and `save`
//! functions of the two files. The broker calls into it from its connection tasks.
//!
//! - [`password`] is the password file, Mosquitto's `password_file` equivalent. mqttd stores
//!   SCRAM-SHA-256 credentials (`$scram-sha-256$...`), so one entry serves both a plain user
//!   name/password CONNECT ([`PasswordFile::verify`]) and SCRAM enhanced authentication
//!   ([`PasswordFile::scram_credentials`]). Existing `mosquitto_passwd` files (`$7$`
//!   PBKDF2-SHA512 and `$6$` SHA-512 entries) load and verify as they are, so a Mosquitto user
//!   can point mqttd at the same file.
//! - [`acl`] is the ACL file, Mosquitto's `acl_file` syntax with its decision order
//!   (anonymous and per-user `topic` entries, `%c`/`%u` `pattern` entries, `deny` first,
//!   default deny), plus an optional check of subscription filters.
//! - [`scram`] is SCRAM-SHA-256 (RFC 5802/7677) as EMQX speaks it over MQTT 5 AUTH packets:
//!   sans-IO state machines for the server and the client, one type per state.
//!
//! Secrets are compared in constant time, an unknown user costs about as much as a known one
//! and fails the same way, and errors map onto MQTT reason codes
//! ([`ScramError::reason_code`]).
//!
//! Checking a plain password costs milliseconds of CPU (PBKDF2 with thousands of iterations),
//! which would stall every connection sharing a runtime worker thread with a flood of CONNECTs
//! carrying wrong passwords. The broker therefore runs those checks on the runtime's
//! blocking pool, at most [`verification_limit`] at once; further CONNECTs
//! wait for a turn.

pub mod acl;
pub mod password;
pub mod scram;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokio::sync::Semaphore;

pub use acl::{Access, AclFile, AclFileError, AclLineError, AclSubject};
pub use password::{
    HashScheme, PasswordFile, PasswordFileError, PasswordLineError, SaveError, SetPasswordError,
};
pub use scram::{
    Iterations, IterationsError, ScramClient, ScramClientFinalSent, ScramCredentials, ScramError,
    ScramServer, ScramServerFirstSent,
};

/// The kind of line-oriented file a [`FileError`] is about.
pub trait FileKind: std::error::Error + 'static {
    /// How the file is called in messages.
    const NAME: &'static str;
}

/// Why a line-oriented file (password file, ACL file) could not be loaded or parsed; `E` says
/// what is wrong with a line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError<E: FileKind> {
    /// The file could not be read (or is not UTF-8).
    #[error("cannot read {} {}: {source}", E::NAME, path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line is not valid.
    #[error("{}: {error}", location(path.as_deref(), *line))]
    Line {
        /// The file, if the text came from one.
        path: Option<PathBuf>,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        error: E,
    },
}

impl<E: FileKind> FileError<E> {
    /// Names `file` as the source of a line error found while parsing its text.
    fn with_path(self, file: &Path) -> Self {
        match self {
            Self::Line { line, error, .. } => Self::Line {
                path: Some(file.to_owned()),
                line,
                error,
            },
            other => other,
        }
    }
}

/// `path:line`, or `line N` for text that did not come from a file: where a parse error is.
fn location(path: Option<&Path>, line: usize) -> String {
    match path {
        Some(path) => format!("{}:{line}", path.display()),
        None => format!("line {line}"),
    }
}

/// The most password verifications that run at once in this process: one per CPU, so that a
/// flood of CONNECTs with wrong passwords costs at most the CPUs' time, never a queue of
/// threads.
pub fn verification_limit() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Turns to run a verification, shared by every broker in the process (they share the CPUs).
fn verification_turns() -> &'static Semaphore {
    static TURNS: OnceLock<Semaphore> = OnceLock::new();
    TURNS.get_or_init(|| Semaphore::new(verification_limit()))
}

/// Runs `verify` on the runtime's blocking pool once fewer than [`verification_limit`]
/// verifications run; waits for a turn meanwhile. `None` if it panicked. The turn is held by
/// the work itself, so a caller that stops waiting (its connection timed out) cannot let more
/// verifications run than the limit.
pub(crate) async fn verify_blocking<T: Send + 'static>(
    verify: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    // The semaphore is never closed.
    let turn = verification_turns().acquire().await.ok()?;
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        verify()
    })
    .await
    .ok()
}
