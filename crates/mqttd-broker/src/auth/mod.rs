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

pub mod acl;
pub mod password;
pub mod scram;

use std::path::Path;

pub use acl::{Access, AclFile, AclFileError, AclLineError, AclSubject};
pub use password::{
    HashScheme, PasswordFile, PasswordFileError, PasswordLineError, SaveError, SetPasswordError,
};
pub use scram::{
    Iterations, IterationsError, ScramClient, ScramClientFinalSent, ScramCredentials, ScramError,
    ScramServer, ScramServerFirstSent,
};

/// `path:line`, or `line N` for text that did not come from a file: where a parse error is.
fn location(path: Option<&Path>, line: usize) -> String {
    match path {
        Some(path) => format!("{}:{line}", path.display()),
        None => format!("line {line}"),
    }
}
