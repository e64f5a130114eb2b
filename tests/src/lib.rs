//! Shared helpers for vmgov's cross-component tests (the tests themselves are in `tests/tests/`).
//!
//! Later tiers (a real etcd on free ports, coordinator and agent processes, QEMU guests) put
//! their harnesses here so that every test starts them the same way: [`guest`] boots QEMU guests,
//! [`etcd`] starts (freezes, restarts) a real etcd server.

pub mod etcd;
pub mod guest;
pub mod process;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Every file under `dir` whose name ends in `suffix`, sorted, skipping `target` and hidden
/// directories.
pub fn files_with_suffix(dir: &Path, suffix: &str) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    stack.push(path);
                }
            } else if name.ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The workspace members, as listed in the top-level `Cargo.toml`.
pub fn workspace_members() -> Result<Vec<String>, ManifestError> {
    let manifest = read_toml(&workspace_root().join("Cargo.toml"))?;
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .ok_or(ManifestError::NoMembers)?;
    Ok(members.iter().filter_map(toml::Value::as_str).map(str::to_owned).collect())
}

/// Reads and parses a TOML file.
pub fn read_toml(path: &Path) -> Result<toml::Table, ManifestError> {
    let text = fs::read_to_string(path)
        .map_err(|source| ManifestError::Read { path: path.into(), source })?;
    text.parse().map_err(|source| ManifestError::Parse { path: path.into(), source })
}

/// A manifest that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// I/O error.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Not TOML.
    #[error("parsing {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// No `[workspace] members`.
    #[error("the top-level Cargo.toml lists no workspace members")]
    NoMembers,
}
