//! `sidenode-cni`, the chained CNI plugin (CNI spec 0.3.x, 0.4.0, 1.0.0; docs/cni.md).
//!
//! The runtime runs it after the cluster's network plugin with the command in `CNI_COMMAND`
//! and the network configuration (with `prevResult`) on stdin. `ADD` sends the pod's network
//! namespace to the node agent's socket and waits for its answer, bounded by `timeoutMs`;
//! what happens when the agent does not answer follows `failPolicy`. `DEL` tells the agent
//! and never fails. Only std and serde_json: it starts in a millisecond and no runtime.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use super::protocol::{self, Command, Outcome, Reply, Request};

/// What the plugin calls itself in the conflist (`"type"`) and in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "sidenode-cni";
/// CNI versions this plugin accepts in `cniVersion` (and reports on `VERSION`).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long `ADD` waits for the agent unless `timeoutMs` says otherwise.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// Longest stdin accepted (bytes).
const MAX_STDIN: u64 = 1024 * 1024;

/// CNI's well-known error codes (spec "Error"), and ours from 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODING: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The agent answered with an error (fail-closed).
    pub const AGENT_ERROR: u32 = 100;
}

/// A CNI error result: printed as JSON on stdout, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error as CNI wants it on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})
            .to_string()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    /// Agent unreachable, slow or failing: the pod starts anyway (the reconcile enrolls it
    /// later); the plugin logs why.
    Open,
    /// The `ADD` fails with a CNI error; the runtime tears the sandbox down and the kubelet
    /// tries again.
    Closed,
}

/// The plugin's fields of the network configuration (plus CNI's own).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The agent's socket (`mesh-node agent --cni-socket`).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// How long `ADD` waits for the agent's answer, in milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_policy")]
    pub fail_policy: FailPolicy,
    /// Append one line per decision here (runtimes drop a successful plugin's stderr).
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(protocol::DEFAULT_SOCKET)
}
fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_policy() -> FailPolicy {
    FailPolicy::Open
}

/// The CNI environment variables the plugin reads.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` split into `KEY=value` pairs.
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    /// From a variable lookup (the process environment in `main`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let args = get("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Self {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args,
        }
    }

    fn arg(&self, k: &str) -> String {
        self.args.get(k).cloned().unwrap_or_default()
    }
}

/// What a run printed and how it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    /// Lines for stderr and the log file.
    pub log: Vec<String>,
    pub ok: bool,
}

/// Parses the configuration, naming the field that is wrong.
pub fn parse_conf(stdin: &str) -> Result<PluginConf, CniError> {
    let de = &mut serde_json::Deserializer::from_str(stdin);
    let conf: PluginConf = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "the network configuration".to_string()
        } else {
            format!("field `{path}`")
        };
        CniError::new(
            code::INVALID_CONFIG,
            format!("sidenode-cni: invalid network configuration: {field}"),
            e.into_inner().to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "sidenode-cni: cniVersion {:?} is not supported",
                conf.cni_version
            ),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if conf.timeout_ms == 0 {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "sidenode-cni: invalid network configuration: field `timeoutMs` must be > 0",
            "",
        ));
    }
    Ok(conf)
}

/// The pod's addresses in a `prevResult` (0.3.0 and later: `ips[].address` = `ip/len`).
fn prev_ips(prev: &Value) -> Result<Vec<String>, CniError> {
    let Some(ips) = prev.get("ips") else {
        return Ok(Vec::new());
    };
    let Some(list) = ips.as_array() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "sidenode-cni: invalid network configuration: field `prevResult.ips` is not a list",
            "",
        ));
    };
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let addr = e.get("address").and_then(Value::as_str).ok_or_else(|| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("sidenode-cni: invalid network configuration: field `prevResult.ips[{i}].address` is missing or not a string"),
                    "",
                )
            })?;
            let ip = addr.split('/').next().unwrap_or(addr);
            ip.parse::<std::net::IpAddr>().map_err(|e| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("sidenode-cni: invalid network configuration: field `prevResult.ips[{i}].address`: {addr:?} is not an address"),
                    e.to_string(),
                )
            })?;
            Ok(ip.to_string())
        })
        .collect()
}

/// Sends one request and reads the reply, all within `timeout`.
pub fn ask(socket: &std::path::Path, req: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let start = Instant::now();
    let left = || {
        timeout
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))
    };
    let mut s = UnixStream::connect(socket)?;
    s.set_write_timeout(Some(left()?))?;
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    s.set_read_timeout(Some(left()?))?;
    let mut r = BufReader::new(s).take(protocol::MAX_LINE as u64);
    let mut buf = String::new();
    r.read_line(&mut buf)?;
    if buf.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without an answer",
        ));
    }
    serde_json::from_str(&buf).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable answer from the agent: {e}"),
        )
    })
}

/// One plugin run: `env` and `stdin` in, what to print out.
pub fn run(env: &CniEnv, stdin: &str) -> Output {
    let mut log = Vec::new();
    match run_inner(env, stdin, &mut log) {
        Ok(stdout) => Output {
            stdout,
            log,
            ok: true,
        },
        Err((e, version)) => {
            log.push(e.to_string());
            Output {
                stdout: e.to_json(&version),
                log,
                ok: false,
            }
        }
    }
}

fn run_inner(
    env: &CniEnv,
    stdin: &str,
    log: &mut Vec<String>,
) -> Result<String, (CniError, String)> {
    let latest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_string();
    if env.command == "VERSION" {
        return Ok(
            json!({"cniVersion": latest, "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    // DEL never fails: a sandbox must always be removable.
    if env.command == "DEL" {
        match parse_conf(stdin) {
            Ok(conf) => {
                let req = request(env, Command::Del, Vec::new());
                let timeout = Duration::from_millis(conf.timeout_ms);
                match ask(&conf.socket, &req, timeout) {
                    Ok(r) => log.push(format!("DEL {}: {:?} {}", pod_name(env), r.outcome, r.message)),
                    Err(e) => log.push(format!(
                        "DEL {}: agent at {} not reached ({e}); its reconcile removes the enrollment",
                        pod_name(env),
                        conf.socket.display()
                    )),
                }
            }
            Err(e) => log.push(format!("DEL {}: {e}; ignored", pod_name(env))),
        }
        return Ok(String::new());
    }
    let conf = parse_conf(stdin).map_err(|e| (e, latest.clone()))?;
    let v = conf.cni_version.clone();
    let fail = |e: CniError| (e, v.clone());
    match env.command.as_str() {
        "ADD" | "CHECK" => {}
        other => {
            return Err(fail(CniError::new(
                code::INVALID_ENV,
                format!("sidenode-cni: CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"),
                "",
            )));
        }
    }
    if env.container_id.is_empty() {
        return Err(fail(CniError::new(
            code::INVALID_ENV,
            "sidenode-cni: CNI_CONTAINERID is not set",
            "",
        )));
    }
    let Some(prev) = conf.prev_result.clone() else {
        return Err(fail(CniError::new(
            code::INVALID_CONFIG,
            "sidenode-cni: invalid network configuration: no field `prevResult`: sidenode-cni is a chained plugin and must come after the network plugin in a conflist",
            "",
        )));
    };
    if !prev.is_object() {
        return Err(fail(CniError::new(
            code::INVALID_CONFIG,
            "sidenode-cni: invalid network configuration: field `prevResult` is not an object",
            "",
        )));
    }
    let ips = prev_ips(&prev).map_err(fail)?;
    let timeout = Duration::from_millis(conf.timeout_ms);
    let pod = pod_name(env);
    let command = if env.command == "ADD" {
        Command::Add
    } else {
        Command::Check
    };
    if command == Command::Add && env.netns.is_empty() {
        return Err(fail(CniError::new(
            code::INVALID_ENV,
            "sidenode-cni: CNI_NETNS is not set",
            "",
        )));
    }
    let req = request(env, command, ips);
    let policy = conf.fail_policy;
    let problem = match ask(&conf.socket, &req, timeout) {
        Ok(r) => match r.outcome {
            Outcome::Enrolled | Outcome::NotMeshed | Outcome::Ok | Outcome::Removed => {
                log.push(format!(
                    "{} {pod}: {:?} {}",
                    env.command, r.outcome, r.message
                ));
                None
            }
            // The agent's state lags (the pod is not in it yet): the reconcile is the
            // backstop; this is not the agent being away, so it succeeds under both policies.
            Outcome::Unknown => {
                log.push(format!(
                    "{} {pod}: the agent does not know the pod yet ({}); its reconcile enrolls it if it belongs in the mesh",
                    env.command, r.message
                ));
                None
            }
            Outcome::Error => Some(CniError::new(
                code::AGENT_ERROR,
                format!("sidenode-cni: the node agent could not enroll pod {pod}"),
                r.message,
            )),
        },
        Err(e) => Some(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "sidenode-cni: no answer from the node agent at {} within {} ms for pod {pod}",
                conf.socket.display(),
                conf.timeout_ms
            ),
            e.to_string(),
        )),
    };
    if let Some(e) = problem {
        match policy {
            FailPolicy::Closed => return Err(fail(e)),
            FailPolicy::Open => log.push(format!(
                "{e}; failPolicy open: the pod starts without waiting"
            )),
        }
    }
    if command == Command::Check {
        return Ok(String::new());
    }
    // Pass the previous result through, in the configuration's version.
    let mut out = prev;
    if let Some(o) = out.as_object_mut() {
        o.insert("cniVersion".into(), Value::String(v.clone()));
    }
    Ok(out.to_string())
}

fn pod_name(env: &CniEnv) -> String {
    let (ns, name) = (env.arg("K8S_POD_NAMESPACE"), env.arg("K8S_POD_NAME"));
    if ns.is_empty() && name.is_empty() {
        format!("(container {})", env.container_id)
    } else {
        format!("{ns}/{name}")
    }
}

fn request(env: &CniEnv, command: Command, ips: Vec<String>) -> Request {
    Request {
        version: protocol::VERSION,
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        pod_namespace: env.arg("K8S_POD_NAMESPACE"),
        pod_name: env.arg("K8S_POD_NAME"),
        pod_uid: env.arg("K8S_POD_UID"),
        ips,
    }
}

/// The `sidenode-cni` binary: real environment and stdin, result on stdout, log lines on
/// stderr (and in `logFile`). Exit status 0 on success, 1 on a CNI error.
pub fn main() -> std::process::ExitCode {
    let env = CniEnv::from_lookup(|k| std::env::var(k).ok());
    let mut stdin = String::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_string(&mut stdin);
    let out = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => {
            let err = CniError::new(
                code::DECODING,
                "sidenode-cni: reading the network configuration from stdin",
                e.to_string(),
            );
            Output {
                stdout: err.to_json(SUPPORTED_VERSIONS[3]),
                log: vec![err.to_string()],
                ok: false,
            }
        }
    };
    let log_file = parse_conf(&stdin).ok().and_then(|c| c.log_file);
    for l in &out.log {
        eprintln!("sidenode-cni: {l}");
    }
    if let Some(path) = log_file
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        for l in &out.log {
            let _ = writeln!(f, "{ts} {l}");
        }
    }
    if !out.stdout.is_empty() {
        println!("{}", out.stdout);
    }
    if out.ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> CniEnv {
        CniEnv::from_lookup(|k| {
            Some(match k {
                "CNI_COMMAND" => cmd.to_string(),
                "CNI_CONTAINERID" => "c1".into(),
                "CNI_NETNS" => "/var/run/netns/x".into(),
                "CNI_IFNAME" => "eth0".into(),
                "CNI_ARGS" => {
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1"
                        .into()
                }
                _ => return None,
            })
        })
    }

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"sidenode-cni","socket":"/nonexistent/sidenode-test.sock","timeoutMs":200{extra},
               "prevResult":{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0"}}],"ips":[{{"address":"10.1.0.5/24","interface":0}}]}}}}"#
        )
    }

    #[test]
    fn args_and_version() {
        let e = env("VERSION");
        assert_eq!(e.arg("K8S_POD_UID"), "u1");
        let out = run(&e, "");
        assert!(out.ok && out.stdout.contains("\"0.4.0\""), "{out:?}");
    }

    #[test]
    fn fail_open_passes_prev_result_fail_closed_errors() {
        let out = run(&env("ADD"), &conf(""));
        assert!(out.ok, "{out:?}");
        let v: Value = serde_json::from_str(&out.stdout).expect("test step");
        assert_eq!(v["ips"][0]["address"], "10.1.0.5/24");
        assert!(
            out.log.iter().any(|l| l.contains("failPolicy open")),
            "{out:?}"
        );

        let out = run(&env("ADD"), &conf(r#","failPolicy":"closed""#));
        assert!(!out.ok);
        let v: Value = serde_json::from_str(&out.stdout).expect("test step");
        assert_eq!(v["code"], code::TRY_AGAIN_LATER);
        assert!(
            v["msg"].as_str().is_some_and(|m| m.contains("shop/web-0")),
            "{v}"
        );
        // DEL never fails, even without the agent or with a broken configuration.
        assert!(run(&env("DEL"), &conf(r#","failPolicy":"closed""#)).ok);
        assert!(run(&env("DEL"), "{").ok);
    }

    #[test]
    fn malformed_config_names_the_field() {
        let out = run(
            &env("ADD"),
            r#"{"cniVersion":"1.0.0","type":"sidenode-cni","timeoutMs":"soon"}"#,
        );
        assert!(!out.ok);
        let v: Value = serde_json::from_str(&out.stdout).expect("test step");
        assert_eq!(v["code"], code::INVALID_CONFIG);
        assert!(
            v["msg"].as_str().is_some_and(|m| m.contains("timeoutMs")),
            "{v}"
        );

        let out = run(
            &env("ADD"),
            r#"{"cniVersion":"1.0.0","type":"sidenode-cni","failPolicy":"maybe"}"#,
        );
        assert!(out.stdout.contains("failPolicy"), "{out:?}");
        let out = run(
            &env("ADD"),
            r#"{"cniVersion":"0.2.0","type":"sidenode-cni"}"#,
        );
        assert!(out.stdout.contains("\"code\":1"), "{out:?}");
        let out = run(
            &env("ADD"),
            r#"{"cniVersion":"1.0.0","type":"sidenode-cni"}"#,
        );
        assert!(out.stdout.contains("prevResult"), "{out:?}");
        let out = run(
            &env("ADD"),
            r#"{"cniVersion":"1.0.0","type":"sidenode-cni","prevResult":{"ips":[{"address":"nope"}]}}"#,
        );
        assert!(out.stdout.contains("prevResult.ips[0].address"), "{out:?}");
        let out = run(&env("ADD"), "not json");
        assert!(out.stdout.contains("\"code\":7"), "{out:?}");
        let out = run(&env("BOGUS"), &conf(""));
        assert!(out.stdout.contains("\"code\":4"), "{out:?}");
    }
}
