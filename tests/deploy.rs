//! The deployment examples stay valid: every TOML file under `deploy/` and
//! `examples/` parses; every spiffe-tunnel config among them, and every one
//! embedded in a Kubernetes ConfigMap, passes `spiffe-tunnel check`; and the
//! numbers that must agree across files do (a stop timeout longer than the
//! drain, a start timeout longer than the wait for the first SVID).
//!
//! YAML syntax is checked by `tests/interop/test_deploy_files.py` (PyYAML):
//! no YAML parser is among the crate's dependencies. The ConfigMap configs
//! are found here as plain text, the block scalar after `tunnel.toml: |`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_spiffe-tunnel");

/// The folders whose files are user-facing examples.
const EXAMPLE_DIRS: [&str; 2] = ["deploy", "examples"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `root` whose name ends with one of `exts`, sorted.
/// Generated `certs/` folders are skipped.
fn files_under(root: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "certs") {
                    dirs.push(path);
                }
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn example_files(exts: &[&str]) -> Vec<PathBuf> {
    EXAMPLE_DIRS
        .iter()
        .flat_map(|d| files_under(&repo().join(d), exts))
        .collect()
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn parse_toml(path: &Path) -> toml::Table {
    let text = fs::read_to_string(path).unwrap();
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("{}: not valid TOML: {e}", rel(path)))
}

fn is_tunnel_config(table: &toml::Table) -> bool {
    table.get("identity").is_some_and(toml::Value::is_table)
}

/// Runs `spiffe-tunnel check -c FILE`; the error names the file and carries
/// what `check` printed.
fn check(config: &Path, shown_as: &str) -> Result<(), String> {
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(config)
        .output()
        .map_err(|e| format!("{shown_as}: cannot run {BIN}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{shown_as}: `check` exited {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Copies a folder tree, leaving out generated `certs/` folders.
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            if entry.file_name() != "certs" {
                copy_tree(&src, &dst);
            }
        } else {
            fs::copy(&src, &dst).unwrap(); // keeps the mode: scripts stay executable
        }
    }
}

/// The TOML documents embedded in a YAML file as block scalars under a key
/// ending in `.toml` (`tunnel.toml: |`), with their indentation removed.
fn embedded_tomls(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent_of = |line: &str| line.len() - line.trim_start().len();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some((key, rest)) = line.trim().split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        if !key.ends_with(".toml") || !matches!(rest.trim(), "|" | "|-" | "|+") {
            continue;
        }
        let key_indent = indent_of(line);
        let mut block = String::new();
        let mut block_indent = None;
        while i < lines.len() {
            let l = lines[i];
            if l.trim().is_empty() {
                block.push('\n');
                i += 1;
                continue;
            }
            let indent = indent_of(l);
            if indent <= key_indent || indent < *block_indent.get_or_insert(indent) {
                break;
            }
            block.push_str(&l[block_indent.unwrap_or(indent)..]);
            block.push('\n');
            i += 1;
        }
        found.push(block);
    }
    found
}

/// The longest `drain_timeout` of a config: `[defaults]` or any tunnel's own,
/// 30s when none is set.
fn longest_drain(config: &toml::Table) -> Duration {
    let duration = |v: Option<&toml::Value>| {
        v.and_then(toml::Value::as_str)
            .map(|s| humantime::parse_duration(s).unwrap())
    };
    let default = duration(config.get("defaults").and_then(|d| d.get("drain_timeout")))
        .unwrap_or(Duration::from_secs(30));
    ["inbound", "outbound"]
        .iter()
        .filter_map(|kind| config.get(*kind).and_then(toml::Value::as_array))
        .flatten()
        .filter_map(|t| duration(t.get("drain_timeout")))
        .fold(default, Duration::max)
}

fn startup_timeout(config: &toml::Table) -> Duration {
    config
        .get("identity")
        .and_then(|i| i.get("startup_timeout"))
        .and_then(toml::Value::as_str)
        .map_or(Duration::from_secs(30), |s| {
            humantime::parse_duration(s).unwrap()
        })
}

#[test]
fn every_toml_file_parses() {
    let files = example_files(&["toml"]);
    assert!(
        files.len() >= 6,
        "expected the example configs, found {files:?}"
    );
    for file in &files {
        parse_toml(file);
    }
}

#[test]
fn every_example_config_passes_check() {
    // `check` loads identity files too, and the file-identity examples' certs
    // are made by examples/files/make-certs.sh. Run it in a copy of the
    // trees, into its default folder there, so the repository's own certs/
    // (which other tests and scripts/test may be using) are never touched.
    let tmp = tempfile::tempdir().unwrap();
    for dir in EXAMPLE_DIRS {
        copy_tree(&repo().join(dir), &tmp.path().join(dir));
    }
    for script in files_under(tmp.path(), &["sh"]) {
        if script.file_name().is_some_and(|n| n == "make-certs.sh") {
            let out = Command::new("bash").arg(&script).output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for file in files_under(tmp.path(), &["toml"]) {
        if !is_tunnel_config(&parse_toml(&file)) {
            continue;
        }
        let shown = file.strip_prefix(tmp.path()).unwrap().display().to_string();
        if let Err(e) = check(&file, &shown) {
            failures.push(e);
        }
        checked.push(shown);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for expected in [
        "deploy/systemd/tunnel.toml",
        "examples/files/inbound.toml",
        "examples/spire/inbound.toml",
    ] {
        assert!(
            checked.iter().any(|c| c == expected),
            "{expected} was not checked; checked {checked:?}"
        );
    }
}

#[test]
fn configs_embedded_in_configmaps_pass_check() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut count = 0;
    for yaml in example_files(&["yaml", "yml"]) {
        let configs = embedded_tomls(&fs::read_to_string(&yaml).unwrap());
        if yaml.starts_with(repo().join("deploy/kubernetes")) {
            assert!(
                !configs.is_empty(),
                "{}: no `tunnel.toml: |` ConfigMap entry found",
                rel(&yaml)
            );
        }
        for (n, text) in configs.iter().enumerate() {
            count += 1;
            let shown = format!("{} (ConfigMap config #{})", rel(&yaml), n + 1);
            let table = text
                .parse::<toml::Table>()
                .unwrap_or_else(|e| panic!("{shown}: not valid TOML: {e}"));
            assert!(is_tunnel_config(&table), "{shown}: has no [identity] table");
            let dir = tmp.path().join(count.to_string());
            fs::create_dir_all(&dir).unwrap();
            let file = dir.join("tunnel.toml");
            fs::write(&file, text).unwrap();
            if let Err(e) = check(&file, &shown) {
                failures.push(e);
            }
        }
    }
    assert!(count >= 2, "expected the DaemonSet and sidecar configs");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kubernetes_grace_periods_outlast_the_drain() {
    for yaml in files_under(&repo().join("deploy/kubernetes"), &["yaml", "yml"]) {
        let text = fs::read_to_string(&yaml).unwrap();
        let drain = embedded_tomls(&text)
            .iter()
            .map(|t| longest_drain(&t.parse().unwrap()))
            .max()
            .unwrap();
        let graces: Vec<u64> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert!(
            !graces.is_empty(),
            "{}: no terminationGracePeriodSeconds",
            rel(&yaml)
        );
        for grace in graces {
            assert!(
                Duration::from_secs(grace) > drain,
                "{}: terminationGracePeriodSeconds {grace} must exceed drain_timeout {drain:?}",
                rel(&yaml)
            );
        }
    }
}

/// `[Section]` names and `Key=Value` lines of a unit file, in order.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line {}: not Key=Value: {line:?}", n + 1));
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "unit line {}: bad key {key:?}",
            n + 1
        );
        assert!(
            !section.is_empty(),
            "unit line {}: outside a section",
            n + 1
        );
        entries.push((section.clone(), key.to_string(), value.to_string()));
    }
    entries
}

#[test]
fn systemd_unit_matches_the_daemon_and_its_config() {
    let unit = fs::read_to_string(repo().join("deploy/systemd/spiffe-tunnel.service")).unwrap();
    let entries = unit_entries(&unit);
    let sections: Vec<&str> = entries.iter().map(|(s, _, _)| s.as_str()).collect();
    for (s, _, _) in &entries {
        assert!(
            ["Unit", "Service", "Install"].contains(&s.as_str()),
            "unknown section [{s}]"
        );
    }
    assert!(sections.contains(&"Install"));
    let values = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        match values(key).as_slice() {
            [v] => v,
            other => panic!("[Service] {key}: expected one value, found {other:?}"),
        }
    };

    assert_eq!(one("Type"), "notify");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/spiffe-tunnel run -c /etc/spiffe-tunnel/tunnel.toml --pid-file /run/spiffe-tunnel/spiffe-tunnel.pid"
    );
    // The new process of an upgrade sends MAINPID=; systemd takes it only so.
    assert_eq!(one("NotifyAccess"), "all");
    assert_eq!(one("RuntimeDirectory"), "spiffe-tunnel");
    assert!(values("ExecReload").contains(&"/bin/kill -HUP $MAINPID"));
    assert_eq!(one("LimitNOFILE"), "1048576");

    // The example config is the one the unit runs: its timeouts must fit.
    let config = parse_toml(&repo().join("deploy/systemd/tunnel.toml"));
    let stop = humantime::parse_duration(one("TimeoutStopSec")).unwrap();
    assert!(
        stop > longest_drain(&config),
        "TimeoutStopSec {stop:?} must exceed drain_timeout {:?}",
        longest_drain(&config)
    );
    let start = humantime::parse_duration(one("TimeoutStartSec")).unwrap();
    assert!(
        start > startup_timeout(&config),
        "TimeoutStartSec {start:?} must exceed startup_timeout {:?}",
        startup_timeout(&config)
    );
}

/// The socket unit passes exactly the addresses the example config
/// listens on (its tunnels and admin), which is how they claim them.
#[test]
fn socket_unit_passes_what_the_config_listens_on() {
    let unit = fs::read_to_string(repo().join("deploy/systemd/spiffe-tunnel.socket")).unwrap();
    let entries = unit_entries(&unit);
    for (s, _, _) in &entries {
        assert!(
            ["Unit", "Socket", "Install"].contains(&s.as_str()),
            "unknown section [{s}]"
        );
    }
    let mut streams: Vec<String> = entries
        .iter()
        .filter(|(s, k, _)| s == "Socket" && k == "ListenStream")
        .map(|(_, _, v)| v.clone())
        .collect();
    let config = parse_toml(&repo().join("deploy/systemd/tunnel.toml"));
    let mut listens: Vec<String> = ["inbound", "outbound"]
        .iter()
        .flat_map(|kind| config[*kind].as_array().cloned().unwrap_or_default())
        .map(|t| t["listen"].as_str().unwrap().to_string())
        .chain(config["admin"]["listen"].as_str().map(str::to_string))
        .collect();
    streams.sort();
    listens.sort();
    assert_eq!(streams, listens);
}

#[test]
fn dockerfile_runs_the_binary_with_the_mounted_config() {
    let text = fs::read_to_string(repo().join("deploy/docker/Dockerfile")).unwrap();
    let instruction = |name: &str| -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|rest| rest.strip_prefix(' '))
            .collect()
    };
    assert_eq!(
        instruction("FROM").len(),
        2,
        "a builder and a runtime stage"
    );
    assert_eq!(instruction("ENTRYPOINT"), [r#"["/spiffe-tunnel"]"#]);
    assert_eq!(
        instruction("CMD"),
        [r#"["run", "-c", "/etc/spiffe-tunnel/tunnel.toml"]"#]
    );
    assert!(instruction("USER").iter().all(|u| u.starts_with("nonroot")));
}

#[test]
fn embedded_toml_extraction() {
    let yaml = "\
kind: ConfigMap
data:
  tunnel.toml: |
    [identity]
    source = \"workload_api\"

    [[inbound]]
      name = \"x\"
  other: value
---
data:
  \"b.toml\": |-
      a = 1
";
    assert_eq!(
        embedded_tomls(yaml),
        [
            "[identity]\nsource = \"workload_api\"\n\n[[inbound]]\n  name = \"x\"\n",
            "a = 1\n"
        ]
    );
}
