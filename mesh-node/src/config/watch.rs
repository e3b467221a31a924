//! A watched folder of YAML files. Each scan re-reads only the files that changed, and keeps
//! the last good version of everything: a file that no longer parses keeps its previous
//! objects, a bad document keeps its object's previous version, and every problem is reported
//! as a [`ConfigError`] naming file, line, object and field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::ConfigError;
use super::parse::{ObjId, parse_file};
use crate::model::{Object, Snapshot};

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

struct FileState {
    stamp: Stamp,
    /// The objects in force from this file (last good).
    objects: BTreeMap<ObjId, Object>,
    /// The problems of the current version of the file.
    errors: Vec<ConfigError>,
}

pub struct FileSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    dir_error: Option<String>,
}

/// The result of one scan.
#[derive(Debug, Default)]
pub struct Scan {
    /// Something in force changed (objects added, removed or updated).
    pub changed: bool,
    /// Problems first seen in this scan (each is reported once, while it lasts).
    pub new_errors: Vec<ConfigError>,
}

fn is_config_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            dir_error: None,
        }
    }

    /// Every problem currently standing.
    #[cfg(test)]
    pub fn errors(&self) -> impl Iterator<Item = &ConfigError> {
        self.files.values().flat_map(|f| f.errors.iter())
    }

    pub fn scan(&mut self) -> Scan {
        let mut scan = Scan::default();
        let listing = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) => {
                // The folder is gone or unreadable: keep everything in force.
                let msg = format!("reading config folder: {e}");
                if self.dir_error.as_deref() != Some(&msg) {
                    scan.new_errors.push(ConfigError {
                        file: self.dir.clone(),
                        line: 0,
                        object: None,
                        field: None,
                        message: msg.clone(),
                    });
                    self.dir_error = Some(msg);
                }
                return scan;
            }
        };
        self.dir_error = None;
        let mut seen = BTreeSet::new();
        for entry in listing.flatten() {
            let path = entry.path();
            if !is_config_file(&path) {
                continue;
            }
            let Ok(md) = std::fs::metadata(&path) else {
                continue;
            };
            if !md.is_file() {
                continue;
            }
            seen.insert(path.clone());
            use std::os::unix::fs::MetadataExt;
            let stamp = Stamp {
                modified: md.modified().ok(),
                len: md.len(),
                ino: md.ino(),
            };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            self.load(path, stamp, &mut scan);
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(f) = self.files.remove(&p) {
                scan.changed |= !f.objects.is_empty();
            }
        }
        scan
    }

    fn load(&mut self, path: PathBuf, stamp: Stamp, scan: &mut Scan) {
        let previous = self.files.remove(&path);
        let prev_objects = previous
            .as_ref()
            .map(|f| f.objects.clone())
            .unwrap_or_default();
        let prev_errors = previous.map(|f| f.errors).unwrap_or_default();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                let err = ConfigError {
                    file: path.clone(),
                    line: 0,
                    object: None,
                    field: None,
                    message: format!("reading file: {e}"),
                };
                if !prev_errors.contains(&err) {
                    scan.new_errors.push(err.clone());
                }
                self.files.insert(
                    path,
                    FileState {
                        stamp,
                        objects: prev_objects,
                        errors: vec![err],
                    },
                );
                return;
            }
        };
        let parsed = parse_file(&path, &text);
        let mut objects: BTreeMap<ObjId, Object> =
            parsed.objects.into_iter().map(|o| (o.id(), o)).collect();
        // Nothing is lost: failed objects keep their last good version.
        for id in &parsed.failed {
            if let Some(old) = prev_objects.get(id) {
                objects.entry(id.clone()).or_insert_with(|| old.clone());
            }
        }
        if parsed.unreadable {
            for (id, old) in &prev_objects {
                objects.entry(id.clone()).or_insert_with(|| old.clone());
            }
        }
        scan.changed |= objects != prev_objects;
        for e in &parsed.errors {
            if !prev_errors.contains(e) {
                scan.new_errors.push(e.clone());
            }
        }
        self.files.insert(
            path,
            FileState {
                stamp,
                objects,
                errors: parsed.errors,
            },
        );
    }

    /// Everything in force, merged. An object defined in two files is taken from the first
    /// file by name; the second is reported.
    pub fn snapshot(&self) -> (Snapshot, Vec<String>) {
        let mut snap = Snapshot::default();
        let mut dups = Vec::new();
        let mut origin_of: BTreeMap<ObjId, &Path> = BTreeMap::new();
        for (path, f) in &self.files {
            for (id, obj) in &f.objects {
                if let Some(first) = origin_of.get(id) {
                    dups.push(format!(
                        "{}: {id} is also defined in {}; using that one",
                        path.display(),
                        first.display()
                    ));
                    continue;
                }
                origin_of.insert(id.clone(), path);
                snap.insert(obj.clone());
            }
        }
        (snap, dups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        // A different length or inode guarantees the change is seen even within one mtime tick.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write temp");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }

    const POD: &str =
        "kind: Pod\nmetadata: {name: a, namespace: mesh}\nstatus: {podIP: 198.19.1.2}\n";

    #[test]
    fn bad_versions_keep_the_last_good_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "pods.yaml", POD);
        let mut src = FileSource::new(dir.path());
        let s = src.scan();
        assert!(s.changed && s.new_errors.is_empty());
        assert_eq!(src.snapshot().0.pods.len(), 1);

        // The same pod loses its IP: error, and the old version stays in force.
        write(
            dir.path(),
            "pods.yaml",
            "kind: Pod\nmetadata: {name: a, namespace: mesh}\n",
        );
        let s = src.scan();
        assert!(!s.changed);
        assert_eq!(s.new_errors.len(), 1);
        assert!(
            s.new_errors[0]
                .to_string()
                .contains("pods.yaml:1: Pod mesh/a: status.podIP")
        );
        let snap = src.snapshot().0;
        assert_eq!(
            snap.pods
                .values()
                .next()
                .map(|p| p.ip.to_string())
                .as_deref(),
            Some("198.19.1.2")
        );

        // Garbage: still in force.
        write(dir.path(), "pods.yaml", "kind: [\n");
        let s = src.scan();
        assert_eq!(s.new_errors.len(), 1);
        assert_eq!(src.snapshot().0.pods.len(), 1);

        // A later good version replaces it; removing the file removes it.
        write(
            dir.path(),
            "pods.yaml",
            &POD.replace("198.19.1.2", "198.19.1.3"),
        );
        assert!(src.scan().changed);
        assert_eq!(src.errors().count(), 0);
        std::fs::remove_file(dir.path().join("pods.yaml")).expect("remove");
        assert!(src.scan().changed);
        assert!(src.snapshot().0.pods.is_empty());
    }

    #[test]
    fn unchanged_files_are_not_reread_and_errors_are_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "bad.yaml", "kind: Pod\nmetadata: {name: x}\n");
        let mut src = FileSource::new(dir.path());
        assert_eq!(src.scan().new_errors.len(), 1);
        let again = src.scan();
        assert!(again.new_errors.is_empty() && !again.changed);
        assert_eq!(src.errors().count(), 1);
    }
}
