//! The installer (docs/cni.md "Install"): puts `sidenode-cni` into a node's CNI configuration
//! and takes it out again.
//!
//! - the binary is copied into the CNI bin dir (to a temporary name, then renamed: a runtime
//!   may be executing the old one);
//! - the plugin entry is appended to the `plugins` of the *first* configuration file of the
//!   conf dir in lexical order (`.conf`, `.conflist`, `.json`), the one containerd, CRI-O and
//!   the kubelet's dockershim use; a lone `.conf`/`.json` is converted to a `.conflist` (the
//!   original name is kept in `sidenodeConvertedFrom`, so uninstall restores it);
//! - installing again changes nothing when the entry is already there and the same (an entry
//!   with other settings is replaced in place), so `--watch` can re-run it to re-add the entry
//!   after the cluster's network plugin rewrote its file;
//! - uninstall removes the entry from every conflist of the conf dir (restoring a converted
//!   `.conf`) and the binary.
//!
//! Files are replaced atomically (write `.<name>.sidenode-tmp`, rename), a name runtimes
//! ignore.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use super::plugin::PLUGIN_TYPE;

/// Marks a conflist made from a single-plugin file: the original file name.
pub const CONVERTED_FROM: &str = "sidenodeConvertedFrom";
/// Default CNI configuration folder (containerd's and CRI-O's).
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// Default CNI binary folder.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
    #[error("{}: no CNI configuration (.conf, .conflist, .json) yet; the cluster's network plugin has not written one", dir.display())]
    NoConfig { dir: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The plugin's settings, as they go into the conflist entry.
#[derive(Clone, Debug)]
pub struct PluginSettings {
    pub socket: PathBuf,
    pub timeout_ms: u64,
    /// `"open"` or `"closed"`.
    pub fail_policy: String,
    pub log_file: Option<PathBuf>,
}

impl PluginSettings {
    /// The conflist entry.
    pub fn entry(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), json!(PLUGIN_TYPE));
        m.insert("socket".into(), json!(self.socket.to_string_lossy()));
        m.insert("timeoutMs".into(), json!(self.timeout_ms));
        m.insert("failPolicy".into(), json!(self.fail_policy));
        if let Some(f) = &self.log_file {
            m.insert("logFile".into(), json!(f.to_string_lossy()));
        }
        Value::Object(m)
    }
}

/// What an install did.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// The entry was there already, identical.
    Unchanged(PathBuf),
    /// Entry added to (or replaced in) this conflist.
    Added(PathBuf),
    /// This single-plugin file became that conflist, with the entry.
    Converted { from: PathBuf, to: PathBuf },
}

/// The configuration file the runtime uses: the first of the conf dir in lexical order.
pub fn first_config(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let rd = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut names: Vec<String> = Vec::new();
    for e in rd {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_conf = [".conf", ".conflist", ".json"]
            .iter()
            .any(|x| name.ends_with(x));
        if is_conf && e.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names.first().map(|n| dir.join(n)))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|source| InstallError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.sidenode-tmp"));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    s.push('\n');
    s.into_bytes()
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Adds (or refreshes) the plugin entry in the conf dir's first configuration.
pub fn install_conf(dir: &Path, settings: &PluginSettings) -> Result<Change, InstallError> {
    let path = first_config(dir)?.ok_or_else(|| InstallError::NoConfig {
        dir: dir.to_path_buf(),
    })?;
    let entry = settings.entry();
    let v = read_json(&path)?;
    let invalid = |msg: &str| InstallError::Invalid {
        path: path.clone(),
        msg: msg.into(),
    };
    if path.extension().is_some_and(|e| e == "conflist") {
        let mut v = v;
        let plugins = v
            .get_mut("plugins")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| invalid("field `plugins` is missing or not a list"))?;
        if plugins.contains(&entry) {
            return Ok(Change::Unchanged(path));
        }
        match plugins.iter().position(is_ours) {
            Some(i) => plugins[i] = entry,
            None => plugins.push(entry),
        }
        write_atomic(&path, &pretty(&v), 0o644)?;
        return Ok(Change::Added(path));
    }
    // A single plugin (.conf / .json): make it a conflist of that plugin and ours.
    let Value::Object(mut single) = v else {
        return Err(invalid("not a JSON object"));
    };
    if single.contains_key("plugins") {
        return Err(invalid(
            "has `plugins` but is not named .conflist; rename it",
        ));
    }
    let version = single
        .remove("cniVersion")
        .ok_or_else(|| invalid("field `cniVersion` is missing"))?;
    let name = single
        .remove("name")
        .ok_or_else(|| invalid("field `name` is missing"))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let list = json!({
        "cniVersion": version,
        "name": name,
        CONVERTED_FROM: file_name,
        "plugins": [Value::Object(single), entry],
    });
    let to = path.with_extension("conflist");
    write_atomic(&to, &pretty(&list), 0o644)?;
    std::fs::remove_file(&path).map_err(io(&path))?;
    Ok(Change::Converted { from: path, to })
}

/// Removes the plugin entry from every conflist in the conf dir (a converted file gets its
/// original name and form back). Returns the files changed.
pub fn uninstall_conf(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(changed),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    paths.sort();
    for path in paths {
        let mut v = read_json(&path)?;
        let Some(plugins) = v.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() == before {
            continue;
        }
        let original = v
            .get(CONVERTED_FROM)
            .and_then(Value::as_str)
            .map(str::to_string);
        match (original, v.get("plugins").and_then(Value::as_array)) {
            (Some(orig), Some(list)) if list.len() == 1 && !orig.contains('/') => {
                let mut single = match list[0].clone() {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                let mut out = Map::new();
                if let Some(cv) = v.get("cniVersion") {
                    out.insert("cniVersion".into(), cv.clone());
                }
                if let Some(n) = v.get("name") {
                    out.insert("name".into(), n.clone());
                }
                out.append(&mut single);
                let to = dir.join(&orig);
                write_atomic(&to, &pretty(&Value::Object(out)), 0o644)?;
                std::fs::remove_file(&path).map_err(io(&path))?;
                changed.push(to);
            }
            _ => {
                if let Some(o) = v.as_object_mut() {
                    o.remove(CONVERTED_FROM);
                }
                write_atomic(&path, &pretty(&v), 0o644)?;
                changed.push(path);
            }
        }
    }
    Ok(changed)
}

/// Copies the plugin binary into the bin dir as `sidenode-cni` unless the same bytes are there.
/// Returns whether it wrote.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let bytes = std::fs::read(src).map_err(io(src))?;
    let dst = bin_dir.join(PLUGIN_TYPE);
    if std::fs::read(&dst).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    write_atomic(&dst, &bytes, 0o755)?;
    Ok(true)
}

/// Removes `sidenode-cni` from the bin dir (fine if absent).
pub fn uninstall_binary(bin_dir: &Path) -> Result<bool, InstallError> {
    let dst = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&dst) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(&dst)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PluginSettings {
        PluginSettings {
            socket: "/var/run/sidenode/cni.sock".into(),
            timeout_ms: 5000,
            fail_policy: "open".into(),
            log_file: None,
        }
    }

    const BRIDGE: &str = r#"{"cniVersion":"0.4.0","name":"k8s-pod-network","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]]}}"#;
    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn json_at(p: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("test step")).expect("test step")
    }

    #[test]
    fn conflist_first_in_lexical_order_idempotent_and_uninstall_restores() {
        let t = tempfile::tempdir().expect("test step");
        let d = t.path();
        std::fs::write(d.join("10-calico.conflist"), LIST).expect("test step");
        std::fs::write(d.join("99-other.conflist"), LIST).expect("test step");
        std::fs::write(d.join("README"), "not a config").expect("test step");
        let first = d.join("10-calico.conflist");
        assert_eq!(
            install_conf(d, &settings()).expect("test step"),
            Change::Added(first.clone())
        );
        let v = json_at(&first);
        assert_eq!(v["plugins"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["plugins"][2]["type"], "sidenode-cni");
        assert_eq!(v["plugins"][2]["failPolicy"], "open");
        // The other file is untouched.
        assert_eq!(
            json_at(&d.join("99-other.conflist")),
            serde_json::from_str::<Value>(LIST).expect("test step")
        );
        // Again: nothing changes.
        assert_eq!(
            install_conf(d, &settings()).expect("test step"),
            Change::Unchanged(first.clone())
        );
        // Other settings: the entry is replaced in place, not duplicated.
        let mut s = settings();
        s.fail_policy = "closed".into();
        assert_eq!(
            install_conf(d, &s).expect("test step"),
            Change::Added(first.clone())
        );
        let v = json_at(&first);
        assert_eq!(v["plugins"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["plugins"][2]["failPolicy"], "closed");
        // The network plugin rewrites its file: installing again re-adds the entry.
        std::fs::write(&first, LIST).expect("test step");
        assert_eq!(
            install_conf(d, &s).expect("test step"),
            Change::Added(first.clone())
        );
        // Uninstall: back to what it was.
        assert_eq!(uninstall_conf(d).expect("test step"), vec![first.clone()]);
        assert_eq!(
            json_at(&first),
            serde_json::from_str::<Value>(LIST).expect("test step")
        );
        assert!(uninstall_conf(d).expect("test step").is_empty());
        // No temporary files left behind.
        let left: Vec<_> = std::fs::read_dir(d)
            .expect("test step")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");
    }

    #[test]
    fn lone_conf_is_converted_and_restored() {
        let t = tempfile::tempdir().expect("test step");
        let d = t.path();
        std::fs::write(d.join("10-bridge.conf"), BRIDGE).expect("test step");
        std::fs::write(d.join("20-later.conflist"), LIST).expect("test step");
        let to = d.join("10-bridge.conflist");
        assert_eq!(
            install_conf(d, &settings()).expect("test step"),
            Change::Converted {
                from: d.join("10-bridge.conf"),
                to: to.clone()
            }
        );
        assert!(!d.join("10-bridge.conf").exists());
        let v = json_at(&to);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["name"], "k8s-pod-network");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["ipam"]["type"], "host-local");
        assert!(v["plugins"][0].get("cniVersion").is_none());
        assert_eq!(v["plugins"][1]["type"], "sidenode-cni");
        // The converted file is still the first one; installing again is a no-op.
        assert_eq!(
            install_conf(d, &settings()).expect("test step"),
            Change::Unchanged(to.clone())
        );
        assert_eq!(
            uninstall_conf(d).expect("test step"),
            vec![d.join("10-bridge.conf")]
        );
        assert!(!to.exists());
        assert_eq!(
            json_at(&d.join("10-bridge.conf")),
            serde_json::from_str::<Value>(BRIDGE).expect("test step")
        );
        assert_eq!(
            json_at(&d.join("20-later.conflist")),
            serde_json::from_str::<Value>(LIST).expect("test step")
        );
    }

    #[test]
    fn problems_name_the_file() {
        let t = tempfile::tempdir().expect("test step");
        let d = t.path();
        assert!(matches!(
            install_conf(d, &settings()),
            Err(InstallError::NoConfig { .. })
        ));
        std::fs::write(d.join("05-broken.conflist"), "{").expect("test step");
        let e = install_conf(d, &settings())
            .expect_err("test step")
            .to_string();
        assert!(
            e.contains("05-broken.conflist") && e.contains("JSON"),
            "{e}"
        );
        std::fs::write(d.join("05-broken.conflist"), r#"{"name":"x"}"#).expect("test step");
        let e = install_conf(d, &settings())
            .expect_err("test step")
            .to_string();
        assert!(e.contains("plugins"), "{e}");
    }

    #[test]
    fn binary_copy_and_removal() {
        let t = tempfile::tempdir().expect("test step");
        let src = t.path().join("src");
        std::fs::write(&src, b"\x7fELF...").expect("test step");
        let bin = t.path().join("bin");
        assert!(install_binary(&src, &bin).expect("test step"));
        assert!(!install_binary(&src, &bin).expect("test step"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bin.join(PLUGIN_TYPE))
            .expect("test step")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(uninstall_binary(&bin).expect("test step"));
        assert!(!uninstall_binary(&bin).expect("test step"));
    }
}
