//! Writing SVIDs, keys and bundles to disk so that no reader ever sees a
//! half-written file or a key from one rotation beside a certificate from
//! another.
//!
//! Each update goes into a fresh version folder (`DIR/..2026-11-22T18:00:00.123456789Z/`),
//! every file written with its final mode and fsynced, the folder fsynced,
//! and then one `rename` swaps the `DIR/..data` symlink to it. The names
//! readers use (`DIR/svid.0.pem`, ...) are symlinks into `..data`. This is
//! the layout Kubernetes uses for secret volumes, so tools that handle
//! those handle this: each file flips atomically, and a reader that wants
//! a matching pair resolves `DIR/..data` once and reads both from there.
//! The previous version stays until the next update, so a reader that
//! resolved it a moment ago can still finish.
//!
//! Single files that another program reads by a fixed path (HAProxy's
//! `crt` file) are written next to their target and renamed over it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Keys: owner only.
pub const KEY_MODE: u32 = 0o600;
/// Certificates and bundles: anyone may read them.
pub const CERT_MODE: u32 = 0o644;

const DATA_LINK: &str = "..data";

/// A failed write, naming the path.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct WriteError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> WriteError + '_ {
    move |source| WriteError {
        path: path.display().to_string(),
        source,
    }
}

/// One file of a set: its name in the folder, contents and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub name: String,
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// Writes `contents` to a new file with `mode` and fsyncs it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(at(path))?;
    file.write_all(contents).map_err(at(path))?;
    file.sync_all().map_err(at(path))?;
    // The umask may have removed bits from `mode`; set it exactly.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(at(path))
}

fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

/// Replaces the whole set of files in `dir` atomically (see the module doc).
/// Names that were in the previous set but not in this one disappear.
pub fn write_set(dir: &Path, files: &[FileSpec]) -> Result<(), WriteError> {
    fs::create_dir_all(dir).map_err(at(dir))?;
    let version_name = format!(
        "..{}",
        humantime::format_rfc3339_nanos(std::time::SystemTime::now())
    );
    let version = dir.join(&version_name);
    fs::create_dir(&version).map_err(at(&version))?;
    for file in files {
        write_new(&version.join(&file.name), &file.contents, file.mode)?;
    }
    sync_dir(&version)?;

    // Swap ..data in one rename.
    let staging = dir.join("..data_tmp");
    let _ = fs::remove_file(&staging);
    symlink(&version_name, &staging).map_err(at(&staging))?;
    let data = dir.join(DATA_LINK);
    let previous = fs::read_link(&data).ok();
    fs::rename(&staging, &data).map_err(at(&data))?;

    // Public names point through ..data, so they follow every swap.
    for file in files {
        let public = dir.join(&file.name);
        let target = PathBuf::from(DATA_LINK).join(&file.name);
        if fs::read_link(&public).ok().as_deref() != Some(target.as_path()) {
            let temp = dir.join(format!(".{}.link", file.name));
            let _ = fs::remove_file(&temp);
            symlink(&target, &temp).map_err(at(&temp))?;
            fs::rename(&temp, &public).map_err(at(&public))?;
        }
    }
    // Names that no longer exist in the new version (a federated trust
    // domain that went away) are removed.
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(link) = fs::read_link(&path) else {
                continue;
            };
            if link.starts_with(DATA_LINK) && !path.exists() {
                let _ = fs::remove_file(&path);
            }
        }
    }
    sync_dir(dir)?;

    // Keep the version just replaced (a reader may be in it); drop older.
    let keep = [Some(PathBuf::from(&version_name)), previous];
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = PathBuf::from(entry.file_name());
            let is_version = name.to_string_lossy().starts_with("..")
                && name != Path::new(DATA_LINK)
                && entry.file_type().is_ok_and(|t| t.is_dir());
            if is_version && !keep.iter().flatten().any(|k| *k == name) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// Replaces one file atomically: temporary file in the same folder, fsync,
/// rename over the target, fsync the folder.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(at(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&temp);
    write_new(&temp, contents, mode)?;
    fs::rename(&temp, path).map_err(at(path))?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec(name: &str, contents: &str, mode: u32) -> FileSpec {
        FileSpec {
            name: name.into(),
            contents: contents.as_bytes().to_vec(),
            mode,
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn sets_swap_whole_and_old_names_go() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_set(
            d,
            &[
                spec("svid.0.pem", "cert1", CERT_MODE),
                spec("svid.0.key", "key1", KEY_MODE),
                spec("federated_bundle.a.org.pem", "fed", CERT_MODE),
            ],
        )
        .unwrap();
        assert_eq!(fs::read_to_string(d.join("svid.0.pem")).unwrap(), "cert1");
        assert_eq!(mode_of(&d.join("svid.0.key")), 0o600);
        assert_eq!(mode_of(&d.join("svid.0.pem")), 0o644);

        for i in 2..5 {
            write_set(
                d,
                &[
                    spec("svid.0.pem", &format!("cert{i}"), CERT_MODE),
                    spec("svid.0.key", &format!("key{i}"), KEY_MODE),
                ],
            )
            .unwrap();
            assert_eq!(
                fs::read_to_string(d.join("svid.0.key")).unwrap(),
                format!("key{i}")
            );
            assert_eq!(
                mode_of(&d.join("svid.0.key")),
                0o600,
                "mode kept on rewrite"
            );
        }
        assert!(
            !d.join("federated_bundle.a.org.pem").exists(),
            "a vanished name stays"
        );
        // The current and the previous version remain, nothing older.
        let versions = fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .count();
        assert_eq!(versions, 2);
    }

    #[test]
    fn single_files_are_replaced_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.pem");
        write_file(&path, b"one", KEY_MODE).unwrap();
        write_file(&path, b"two", KEY_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a temporary file was left"
        );
    }
}
