//! The `file` source: a local file in authorized_keys format or in one of
//! the control plane's JSON forms. The agent re-reads it when its directory
//! watch sees a change, and at each poll; an unchanged file (same inode,
//! size and mtime) answers "unchanged" without being read.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::format::parse_file;
use super::{Answer, FetchFuture, KeySource, SourceError};

pub struct FileSource {
    path: PathBuf,
    max_body: u64,
    seen: Option<(u64, u64, u64, i64, i64)>,
}

impl FileSource {
    pub fn new(path: PathBuf, max_body: u64) -> Self {
        FileSource {
            path,
            max_body,
            seen: None,
        }
    }

    /// The file the source reads (its directory is what gets watched).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    async fn fetch_once(&mut self) -> Result<Answer, SourceError> {
        let unreadable = |e: std::io::Error| SourceError::Transient {
            what: format!("cannot read {}", self.path.display()),
            retry_after: None,
            source: Some(Box::new(e)),
        };
        let meta = tokio::fs::metadata(&self.path).await.map_err(unreadable)?;
        if !meta.is_file() {
            return Err(SourceError::transient(format!(
                "{} is not a regular file",
                self.path.display()
            )));
        }
        if meta.len() > self.max_body {
            return Err(SourceError::transient(format!(
                "{} is over max_body ({} bytes)",
                self.path.display(),
                self.max_body
            )));
        }
        let identity = (
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        if self.seen == Some(identity) {
            return Ok(Answer::Unchanged);
        }
        let bytes = tokio::fs::read(&self.path).await.map_err(unreadable)?;
        let entries = parse_file(&bytes)?;
        self.seen = Some(identity);
        Ok(Answer::List {
            entries,
            etag: None,
        })
    }
}

impl KeySource for FileSource {
    fn fetch(&mut self) -> FetchFuture<'_> {
        Box::pin(self.fetch_once())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_both_formats_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team\nssh-ed25519 AAAA a\n").unwrap();
        let mut src = FileSource::new(path.clone(), 1 << 20);
        assert_eq!(
            src.fetch().await.unwrap(),
            Answer::List {
                entries: vec!["ssh-ed25519 AAAA a".into()],
                etag: None
            }
        );
        assert_eq!(src.fetch().await.unwrap(), Answer::Unchanged);
        std::fs::write(&path, r#"{"ssh_keys":[{"ssh_key":"ssh-ed25519 BBBB b"}]}"#).unwrap();
        assert_eq!(
            src.fetch().await.unwrap(),
            Answer::List {
                entries: vec!["ssh-ed25519 BBBB b".into()],
                etag: None
            }
        );
        std::fs::write(&path, "").unwrap();
        assert_eq!(
            src.fetch().await.unwrap(),
            Answer::List {
                entries: vec![],
                etag: None
            }
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            src.fetch().await,
            Err(SourceError::Transient { .. })
        ));
        std::fs::write(&path, "[broken").unwrap();
        assert!(matches!(
            src.fetch().await,
            Err(SourceError::Transient { .. })
        ));
    }
}
