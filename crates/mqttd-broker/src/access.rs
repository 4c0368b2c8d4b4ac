//! The built-in authentication and authorization: anonymous access, the password file and the
//! ACL file, reloadable as a whole (SIGHUP).

use std::path::Path;

use mqttd_proto::ReasonCode;

use crate::auth::{Access, AclFile, AclSubject, PasswordFile};
use crate::config::Config;
use crate::hooks::{Action, ClientInfo, ConnectAttempt};

/// Why the access files could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The password file is unreadable or invalid.
    #[error(transparent)]
    Passwords(#[from] crate::auth::PasswordFileError),
    /// The ACL file is unreadable or invalid.
    #[error(transparent)]
    Acl(#[from] crate::auth::AclFileError),
}

/// A consistent set of access rules.
#[derive(Debug, Default)]
pub struct AccessControl {
    /// Whether clients without a user name may connect.
    pub anonymous: bool,
    /// Known users.
    pub passwords: Option<PasswordFile>,
    /// Topic permissions.
    pub acl: Option<AclFile>,
}

impl AccessControl {
    /// Loads the files `config` names.
    pub fn load(config: &Config) -> Result<Self, AccessError> {
        let passwords = config
            .password_file
            .as_deref()
            .map(PasswordFile::load)
            .transpose()?;
        let acl = config.acl_file.as_deref().map(load_acl).transpose()?;
        Ok(Self {
            anonymous: config.anonymous_allowed(),
            passwords,
            acl,
        })
    }

    /// Checks a CONNECT's credentials (Mosquitto's rules): a user name is checked against the
    /// password file if there is one; without a user name the client is anonymous.
    pub fn authenticate(&self, attempt: &ConnectAttempt<'_>) -> Result<(), ReasonCode> {
        match (attempt.username, &self.passwords) {
            (Some(user), Some(passwords)) => {
                let password = attempt.password.map_or(&[][..], |p| &p[..]);
                if passwords.verify(user.as_str(), password) {
                    Ok(())
                } else {
                    Err(ReasonCode::BadUserNameOrPassword)
                }
            }
            _ if self.anonymous => Ok(()),
            (Some(_), None) => Err(ReasonCode::BadUserNameOrPassword),
            (None, _) => Err(ReasonCode::NotAuthorized),
        }
    }

    /// Checks a topic action against the ACL; everything is allowed without one.
    pub fn authorize(&self, client: &ClientInfo, action: Action, topic: &str) -> bool {
        let Some(acl) = &self.acl else { return true };
        let subject = AclSubject {
            client_id: client.client_id.as_str(),
            username: client.username.as_deref(),
        };
        let access = match action {
            Action::Publish => Access::Write,
            Action::Subscribe => Access::Subscribe,
            Action::Receive => Access::Read,
        };
        acl.check(&subject, access, topic)
    }
}

fn load_acl(path: &Path) -> Result<AclFile, crate::auth::AclFileError> {
    AclFile::load(path)
}
