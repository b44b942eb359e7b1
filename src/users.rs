//! Target users: who they are on this machine and which file is theirs.
//!
//! A user that does not exist is reported and skipped; the others go on.

use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid, User};

use crate::config::{UserSettings, WriteMode};
use crate::write::FileSpec;

/// A config user resolved against the passwd database.
#[derive(Debug, Clone)]
pub(crate) struct Account {
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UserError {
    /// Reported in status; the user is skipped until it exists.
    #[error("user {0} does not exist")]
    NoSuchUser(String),
    #[error("cannot look up user {name}: {source}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("user {name}: home {home} is not an absolute path")]
    BadHome { name: String, home: PathBuf },
}

/// Looks a user up in passwd (NSS).
pub(crate) fn lookup(name: &str) -> Result<Account, UserError> {
    match User::from_name(name) {
        Ok(Some(user)) => {
            if !user.dir.is_absolute() {
                return Err(UserError::BadHome {
                    name: name.to_string(),
                    home: user.dir,
                });
            }
            Ok(Account {
                uid: user.uid,
                gid: user.gid,
                home: user.dir,
            })
        }
        Ok(None) => Err(UserError::NoSuchUser(name.to_string())),
        Err(source) => Err(UserError::Lookup {
            name: name.to_string(),
            source,
        }),
    }
}

/// Expands a configured path (`~/…` or absolute) for an account.
pub(crate) fn expand(path: &str, account: &Account) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => account.home.join(rest),
        None => PathBuf::from(path),
    }
}

/// The write spec for a user's file in the home, or None in `none` mode.
///
/// Inside the user's home the writer acts with the user's fsuid/fsgid (unless
/// the user is root), so the kernel refuses whatever the user could not do.
/// A path outside the home is root-administered: its parent directory is the
/// trusted base.
pub(crate) fn home_file_spec(settings: &UserSettings, account: &Account) -> Option<FileSpec> {
    if settings.write == WriteMode::None {
        return None;
    }
    let path = expand(settings.path.as_deref()?, account);
    let in_home = path.starts_with(&account.home) && path != account.home;
    let base = if in_home {
        account.home.clone()
    } else {
        // Root-administered: the nearest existing ancestor is trusted and
        // whatever is missing below it is created.
        let mut base = path.parent().unwrap_or(Path::new("/"));
        while !base.is_dir() {
            match base.parent() {
                Some(up) => base = up,
                None => break,
            }
        }
        base.to_path_buf()
    };
    let act_as = (in_home && !account.uid.is_root()).then_some((account.uid, account.gid));
    Some(FileSpec {
        path,
        base,
        owner: Some((account.uid, account.gid)),
        act_as,
        file_mode: 0o600,
        dir_mode: 0o700,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(uid: u32) -> Account {
        Account {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(uid),
            home: PathBuf::from("/home/alice"),
        }
    }

    fn user(write: WriteMode, path: Option<&str>) -> UserSettings {
        UserSettings {
            name: "alice".into(),
            sources: vec!["a".into()],
            write,
            path: path.map(str::to_string),
            options: None,
        }
    }

    #[test]
    fn home_paths_act_as_the_user() {
        let spec = home_file_spec(
            &user(WriteMode::Block, Some("~/.ssh/authorized_keys")),
            &account(1000),
        )
        .unwrap();
        assert_eq!(spec.path, PathBuf::from("/home/alice/.ssh/authorized_keys"));
        assert_eq!(spec.base, PathBuf::from("/home/alice"));
        assert_eq!(
            spec.act_as,
            Some((Uid::from_raw(1000), Gid::from_raw(1000)))
        );
        let root = home_file_spec(
            &user(WriteMode::Block, Some("~/.ssh/authorized_keys")),
            &account(0),
        )
        .unwrap();
        assert_eq!(root.act_as, None);
    }

    #[test]
    fn outside_home_is_root_administered() {
        let spec = home_file_spec(
            &user(
                WriteMode::Fragment,
                Some("/etc/keysync-test-none/keys/alice"),
            ),
            &account(1000),
        )
        .unwrap();
        assert_eq!(spec.base, PathBuf::from("/etc"));
        assert_eq!(spec.act_as, None);
        assert!(home_file_spec(&user(WriteMode::None, None), &account(1000)).is_none());
    }

    #[test]
    fn root_exists_and_nobody_else_is_made_up() {
        assert_eq!(lookup("root").unwrap().uid, Uid::from_raw(0));
        assert!(matches!(
            lookup("no-such-user-keysync-test"),
            Err(UserError::NoSuchUser(_))
        ));
    }
}
