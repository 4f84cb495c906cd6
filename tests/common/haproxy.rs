#![allow(dead_code)]
//! A real HAProxy for interop tests: started in the foreground (`-db`) from
//! a config written into a temporary folder, driven through its stats
//! socket (the runtime API `svid watch` pushes into), killed when dropped.
//!
//! HAProxy is required, not optional: without it the test fails and says
//! how to install it (`scripts/test` installs the Debian package).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The haproxy binary: `$HAPROXY`, then `PATH`, then Debian's `/usr/sbin`
/// (not on a non-root user's PATH). Fails the test when there is none.
pub fn binary() -> PathBuf {
    if let Some(explicit) = std::env::var_os("HAPROXY") {
        let explicit = PathBuf::from(explicit);
        assert!(
            explicit.is_file(),
            "$HAPROXY is {}, which is not a file",
            explicit.display()
        );
        return explicit;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "haproxy not found on PATH (nor in /usr/sbin): the HAProxy interop tests need a \
                 real one. Install it (`apt-get install haproxy`; scripts/test does) or point \
                 $HAPROXY at the binary."
            )
        })
}

/// The example config `examples/haproxy/<name>` with each `(from, to)`
/// replaced, so tests run the very configs the docs show. Every `from`
/// must occur in the file: an example edited out of shape fails loudly
/// instead of silently testing something else.
pub fn example_config(name: &str, replacements: &[(&str, &str)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/haproxy")
        .join(name);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    for (from, to) in replacements {
        assert!(
            text.contains(from),
            "{} no longer contains {from:?}; update the test with the example",
            path.display()
        );
        text = text.replace(from, to);
    }
    text
}

/// A running HAProxy; killed when dropped.
pub struct HaProxy {
    child: Child,
    /// The stats socket (`stats socket ... level admin`).
    pub admin: PathBuf,
    /// The master CLI, when HAProxy runs master-worker (`-W -S`).
    pub master: Option<PathBuf>,
    log: PathBuf,
}

impl HaProxy {
    /// Writes `config` to `dir/<name>.cfg` and starts HAProxy on it in the
    /// foreground; returns once its runtime API answers (listeners are
    /// bound before HAProxy starts serving the CLI). `admin` is the stats
    /// socket the config declares.
    pub fn start(dir: &Path, name: &str, config: &str, admin: &Path) -> Self {
        Self::start_in(None, dir, name, config, admin)
    }

    /// [`HaProxy::start`] inside network namespace `netns` (a node of
    /// `netns.rs`), through `ip netns exec`, which execs HAProxy: the pid
    /// is HAProxy's own. Its stats socket stays in the shared file system.
    pub fn start_in(
        netns: Option<&str>,
        dir: &Path,
        name: &str,
        config: &str,
        admin: &Path,
    ) -> Self {
        Self::launch(netns, dir, name, config, admin, None)
    }

    /// [`HaProxy::start_in`] in master-worker mode (`-W`, as Debian's
    /// haproxy.service runs it) with its master CLI at `master` (`-S`):
    /// [`HaProxy::pid`] is the master's, which a `reload` keeps, and
    /// [`HaProxy::reported_pid`] the worker's, which a reload replaces.
    pub fn start_master_worker_in(
        netns: Option<&str>,
        dir: &Path,
        name: &str,
        config: &str,
        admin: &Path,
        master: &Path,
    ) -> Self {
        Self::launch(netns, dir, name, config, admin, Some(master))
    }

    fn launch(
        netns: Option<&str>,
        dir: &Path,
        name: &str,
        config: &str,
        admin: &Path,
        master: Option<&Path>,
    ) -> Self {
        let cfg = dir.join(format!("{name}.cfg"));
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let bin = binary();
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if let Some(master) = master {
            command.arg("-W").arg("-S").arg(master);
        }
        let child = command
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut haproxy = HaProxy {
            child,
            admin: admin.to_path_buf(),
            master: master.map(Path::to_path_buf),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!(
                    "HAProxy exited at start ({status}); config:\n{config}\noutput:\n{}",
                    haproxy.log()
                );
            }
            if haproxy
                .try_cli("show info")
                .is_ok_and(|a| a.contains("Pid:"))
            {
                return haproxy;
            }
            assert!(
                Instant::now() < deadline,
                "HAProxy's runtime API at {} did not answer within 10 s; output:\n{}",
                admin.display(),
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One runtime API command and its whole answer, or why there is none
    /// (HAProxy gone, for one).
    pub fn try_cli(&self, command: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(&self.admin)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(command.as_bytes())?;
        stream.write_all(b"\n")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// One runtime API command and its whole answer.
    pub fn cli(&self, command: &str) -> String {
        self.try_cli(command)
            .unwrap_or_else(|e| panic!("HAProxy runtime API `{command}`: {e}"))
    }

    /// The pid HAProxy reports about itself (`show info`).
    pub fn reported_pid(&self) -> u32 {
        let info = self.cli("show info");
        info.lines()
            .find_map(|l| l.strip_prefix("Pid: "))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Pid in `show info`:\n{info}"))
    }

    /// [`HaProxy::reported_pid`], or `None` when the stats socket does not
    /// answer (as for a moment while a reload hands it over).
    pub fn try_reported_pid(&self) -> Option<u32> {
        let info = self.try_cli("show info").ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Pid: "))
            .and_then(|p| p.trim().parse().ok())
    }

    /// The serial of the certificate HAProxy holds for `file` (`show ssl
    /// cert FILE`), lower-case hex without leading zeros; `None` while
    /// HAProxy's certificate store is locked by a commit in progress.
    pub fn cert_serial(&self, file: &Path) -> Option<String> {
        self.cert_serial_and_issuer(file).map(|(serial, _)| serial)
    }

    /// The serial (as [`HaProxy::cert_serial`]) and the issuer's name
    /// (`Issuer: /C=US/O=SPIFFE/...`) of the certificate HAProxy holds for
    /// `file`; `None` while locked.
    pub fn cert_serial_and_issuer(&self, file: &Path) -> Option<(String, String)> {
        let answer = self.cli(&format!("show ssl cert {}", file.display()));
        if answer.contains("currently locked") {
            return None;
        }
        let field = |name: &str| {
            answer
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|| panic!("no {name} in `show ssl cert`:\n{answer}"))
        };
        let serial = field("Serial: ").trim_start_matches('0').to_lowercase();
        Some((serial, field("Issuer: ")))
    }

    /// The serials of the CA certificates HAProxy has committed for the
    /// `ca-file` `file` (`show ssl ca-file FILE`); `None` while locked.
    pub fn ca_file_serials(&self, file: &Path) -> Option<BTreeSet<String>> {
        let answer = self.cli(&format!("show ssl ca-file {}", file.display()));
        if answer.contains("currently locked") {
            return None;
        }
        let serials: BTreeSet<String> = answer
            .lines()
            .filter_map(|l| l.strip_prefix("Serial: "))
            .map(|s| s.trim().trim_start_matches('0').to_lowercase())
            .collect();
        assert!(
            !serials.is_empty(),
            "no Serial in `show ssl ca-file`:\n{answer}"
        );
        Some(serials)
    }

    /// The master's pid, as its master CLI gives it (`show proc`). A
    /// reload re-executes the master, which then binds its CLI anew:
    /// refusals meanwhile are waited out, for up to 10 s.
    pub fn master_pid(&self) -> u32 {
        let master = self.master.as_ref().expect("not started master-worker");
        let ask = || -> std::io::Result<String> {
            let mut stream = UnixStream::connect(master)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"show proc\n")?;
            stream.shutdown(std::net::Shutdown::Write)?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = ask();
            let pid = answer.as_ref().ok().and_then(|answer| {
                answer
                    .lines()
                    .find(|l| l.split_whitespace().nth(1) == Some("master"))
                    .and_then(|l| l.split_whitespace().next())
                    .and_then(|p| p.parse().ok())
            });
            if let Some(pid) = pid {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no master in `show proc` on {}: {answer:?}",
                master.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs (it was neither restarted nor died).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The release HAProxy reports (`show info`: `Version: 2.6.12-1+deb12u4`).
    pub fn version(&self) -> String {
        let info = self.cli("show info");
        info.lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no Version in `show info`:\n{info}"))
    }

    /// HAProxy's major and minor release (`2.6.12-1+deb12u4` -> (2, 6)).
    pub fn release(&self) -> (u32, u32) {
        let version = self.version();
        let mut parts = version.split(|c: char| !c.is_ascii_digit());
        let mut next = || -> u32 {
            parts
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("HAProxy version {version:?}"))
        };
        (next(), next())
    }

    /// Whether this HAProxy has bug #3165 (a runtime CA commit breaks it;
    /// fixed in 3.3.0): every release before 3.3, as `svid watch` judges
    /// it, stated here on its own so the tests do not take the code's word.
    pub fn has_ca_commit_bug(&self) -> bool {
        self.release() < (3, 3)
    }

    /// `set ssl <object> FILE` with `pem` as payload (empty lines, which
    /// would end it, dropped), then `commit ssl <object> FILE`; the
    /// commit's answer, or the error of a connection HAProxy dropped.
    pub fn set_and_commit(&self, object: &str, file: &Path, pem: &str) -> Result<String, String> {
        let payload: String = pem
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty())
            .flat_map(|l| [l, "\n"])
            .collect();
        let name = file.display();
        let set = self
            .try_cli(&format!("set ssl {object} {name} <<\n{payload}"))
            .map_err(|e| e.to_string())?;
        assert!(
            set.to_lowercase().contains("transaction created"),
            "set ssl {object}: {set}"
        );
        self.try_cli(&format!("commit ssl {object} {name}"))
            .map_err(|e| e.to_string())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        // Whether it was still running is worth knowing when a test fails.
        let ended = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let state = ended.map_or("still running".to_string(), |s| format!("had exited: {s}"));
            eprintln!(
                "---- HAProxy log {} ({state}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}
