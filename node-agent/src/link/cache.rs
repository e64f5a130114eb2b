//! The agent's local cache of what the coordinator pushed last: the model and the thresholds,
//! each with its fence. Written atomically (temporary file, fsync, rename, fsync of the
//! directory), so a crash leaves the old file or the new one, never half of one; read at start,
//! so a restarted agent decides at once from its last state even with no coordinator.

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use prost::Message;
use thiserror::Error;
use vmgov_proto::pb;

/// A cache file that could not be written.
#[derive(Debug, Error)]
#[error("writing cache file {path}")]
pub struct CacheError {
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

const MODEL: &str = "model.pb";
const THRESHOLDS: &str = "thresholds.pb";

impl Cache {
    /// A cache in `dir` (created if missing).
    pub fn new(dir: &Path) -> Result<Self, CacheError> {
        fs::create_dir_all(dir).map_err(|source| CacheError { path: dir.into(), source })?;
        Ok(Self { dir: dir.into() })
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let err = |source| CacheError { path: path.clone(), source };
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(err)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(err)
    }

    fn read<M: Message + Default>(&self, name: &str) -> Option<M> {
        let path = self.dir.join(name);
        let bytes = fs::read(&path).ok()?;
        match M::decode(bytes.as_slice()) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable cache file");
                None
            }
        }
    }

    /// Saves the model push.
    pub fn save_model(&self, push: &pb::ModelPush) -> Result<(), CacheError> {
        self.write(MODEL, &push.encode_to_vec())
    }

    /// The cached model push, if a readable one exists.
    pub fn model(&self) -> Option<pb::ModelPush> {
        self.read(MODEL)
    }

    /// Saves the thresholds push.
    pub fn save_thresholds(&self, push: &pb::ThresholdPush) -> Result<(), CacheError> {
        self.write(THRESHOLDS, &push.encode_to_vec())
    }

    /// The cached thresholds push, if a readable one exists.
    pub fn thresholds(&self) -> Option<pb::ThresholdPush> {
        self.read(THRESHOLDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_survive_a_restart_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(&dir.path().join("cache")).unwrap();
        assert!(cache.model().is_none());
        let push = pb::ThresholdPush {
            fence: Some(pb::Fence { epoch: 3, generation: 9 }),
            ..pb::ThresholdPush::default()
        };
        cache.save_thresholds(&push).unwrap();
        let again = Cache::new(&dir.path().join("cache")).unwrap();
        assert_eq!(again.thresholds(), Some(push));
        std::fs::write(dir.path().join("cache").join(MODEL), b"\xff\xff not protobuf").unwrap();
        assert!(again.model().is_none());
        assert!(!dir.path().join("cache").join(".thresholds.pb.tmp").exists());
    }
}
