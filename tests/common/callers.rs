#![allow(dead_code)]
//! Local callers of a `present = "caller"` outbound, each a process of its
//! own user, and a target that checks every connection's SPIFFE ID against
//! the user that opened it.
//!
//! A caller is this very test binary run again under another uid (with
//! `setpriv`-like uid and gid from [`super::spire::command_as`]) with
//! `ST_CALLER_*` in its environment: the test binary must define
//!
//! ```ignore
//! #[test]
//! fn caller_process() { common::callers::child_main() }
//! ```
//!
//! which does nothing unless those variables are set. The child opens
//! connections (`concurrency` at a time) until a stop file appears, a count
//! is reached, or a deadline passes, writes `uid:N\n` as each connection's
//! first bytes, and expects `ok\n` back. It prints one report line.
//!
//! [`IdTarget`] sits behind an inbound with `proxy_protocol = true`: it
//! reads the PROXY v2 header, takes the SPIFFE ID from its TLV 0xE0, reads
//! the `uid:N` line, and answers `ok` only when the ID is the one that uid
//! must have; anything else is counted as a mismatch.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::pp2;
use super::spire::command_as;

const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;

/// The target that judges every connection.
pub struct IdTarget {
    pub addr: SocketAddr,
    pub checked: Arc<AtomicUsize>,
    pub mismatches: Arc<AtomicUsize>,
    /// The first few mismatches, described.
    pub mismatch_log: Arc<Mutex<Vec<String>>>,
    /// Connections per SPIFFE ID seen.
    pub seen: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IdTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IdTarget {
    /// `expected`: the SPIFFE ID each uid must arrive with.
    pub async fn start(expected: HashMap<u32, String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let checked = Arc::new(AtomicUsize::new(0));
        let mismatches = Arc::new(AtomicUsize::new(0));
        let mismatch_log = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let expected = Arc::new(expected);
        let task = {
            let (checked, mismatches, mismatch_log, seen) = (
                Arc::clone(&checked),
                Arc::clone(&mismatches),
                Arc::clone(&mismatch_log),
                Arc::clone(&seen),
            );
            tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let expected = Arc::clone(&expected);
                    let (checked, mismatches, mismatch_log, seen) = (
                        Arc::clone(&checked),
                        Arc::clone(&mismatches),
                        Arc::clone(&mismatch_log),
                        Arc::clone(&seen),
                    );
                    tokio::spawn(async move {
                        let verdict = judge(&mut stream, &expected).await;
                        let answer = match verdict {
                            Ok(id) => {
                                *seen.lock().unwrap().entry(id).or_default() += 1;
                                checked.fetch_add(1, Ordering::Relaxed);
                                "ok\n".to_string()
                            }
                            Err(why) => {
                                checked.fetch_add(1, Ordering::Relaxed);
                                mismatches.fetch_add(1, Ordering::Relaxed);
                                let mut log = mismatch_log.lock().unwrap();
                                if log.len() < 20 {
                                    log.push(why.clone());
                                }
                                format!("mismatch: {why}\n")
                            }
                        };
                        let _ = stream.write_all(answer.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    });
                }
            })
        };
        Self {
            addr,
            checked,
            mismatches,
            mismatch_log,
            seen,
            task,
        }
    }

    pub fn mismatches(&self) -> usize {
        self.mismatches.load(Ordering::Relaxed)
    }

    pub fn checked(&self) -> usize {
        self.checked.load(Ordering::Relaxed)
    }

    pub fn seen(&self, id: &str) -> usize {
        self.seen.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

/// The ID the PROXY header names, if it is the one the client's uid line
/// must have.
async fn judge(
    stream: &mut tokio::net::TcpStream,
    expected: &HashMap<u32, String>,
) -> Result<String, String> {
    let mut header = vec![0u8; 16];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("no PROXY header: {e}"))?;
    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    header.resize(16 + len, 0);
    stream
        .read_exact(&mut header[16..])
        .await
        .map_err(|e| format!("short PROXY header: {e}"))?;
    let decoded = pp2::decode(&header).map_err(|e| format!("bad PROXY header: {e:?}"))?;
    let id = decoded
        .tlv(PP2_TYPE_SPIFFE_ID)
        .map(|v| String::from_utf8_lossy(v).to_string())
        .ok_or("no SPIFFE ID TLV")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        stream
            .read_exact(&mut byte)
            .await
            .map_err(|e| format!("no uid line: {e}"))?;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line).to_string();
    let uid: u32 = line
        .strip_prefix("uid:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("bad uid line {line:?}"))?;
    match expected.get(&uid) {
        Some(want) if *want == id => Ok(id),
        Some(want) => Err(format!("uid {uid} arrived as {id}, must be {want}")),
        None => Err(format!("uid {uid} (unexpected) arrived as {id}")),
    }
}

/// What one caller process did.
#[derive(Debug, Clone, Default)]
pub struct CallerReport {
    pub ok: usize,
    pub failed: usize,
    pub errors: Vec<String>,
}

/// How a caller process runs.
#[derive(Debug, Clone)]
pub struct CallerRun {
    /// `IP:port` or `unix:/path` of the outbound.
    pub addr: String,
    pub uid: u32,
    pub concurrency: usize,
    /// Stop after this many connections (all threads together)...
    pub count: Option<usize>,
    /// ... or once this file exists ...
    pub stop_file: Option<PathBuf>,
    /// ... and at the latest after this long.
    pub max_time: Duration,
}

impl CallerRun {
    pub fn count(addr: impl ToString, uid: u32, count: usize) -> Self {
        Self {
            addr: addr.to_string(),
            uid,
            concurrency: 1,
            count: Some(count),
            stop_file: None,
            max_time: Duration::from_secs(60),
        }
    }

    pub fn until(addr: impl ToString, uid: u32, stop_file: &Path, concurrency: usize) -> Self {
        Self {
            addr: addr.to_string(),
            uid,
            concurrency,
            count: None,
            stop_file: Some(stop_file.to_path_buf()),
            max_time: Duration::from_secs(120),
        }
    }

    /// Runs the caller process as `uid` and waits for its report.
    pub async fn run(&self) -> CallerReport {
        let exe = std::env::current_exe().unwrap();
        let mut command = command_as(&exe, self.uid);
        command
            .args([
                "--exact",
                "caller_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ST_CALLER_ADDR", &self.addr)
            .env("ST_CALLER_UID", self.uid.to_string())
            .env("ST_CALLER_CONCURRENCY", self.concurrency.to_string())
            .env("ST_CALLER_MAX_MS", self.max_time.as_millis().to_string());
        if let Some(count) = self.count {
            command.env("ST_CALLER_COUNT", count.to_string());
        }
        if let Some(stop) = &self.stop_file {
            command.env("ST_CALLER_STOP", stop);
        }
        let out = tokio::process::Command::from(command)
            .output()
            .await
            .expect("run the caller process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("CALLER-REPORT "))
            .unwrap_or_else(|| {
                panic!(
                    "caller process as uid {} printed no report: {stdout}\n{}",
                    self.uid,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let v: Value = serde_json::from_str(line).unwrap();
        CallerReport {
            ok: v["ok"].as_u64().unwrap_or(0) as usize,
            failed: v["failed"].as_u64().unwrap_or(0) as usize,
            errors: v["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect(),
        }
    }
}

/// What SPIRE's admin API at `socket` answers a process of `uid` that
/// asks for its own SVIDs by pid: `Code: message`, or the first answer.
pub async fn admin_probe(socket: &Path, uid: u32) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut command = command_as(&exe, uid);
    command
        .args([
            "--exact",
            "caller_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ST_ADMIN_PROBE", socket);
    let out = tokio::process::Command::from(command)
        .output()
        .await
        .expect("run the admin probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ADMIN-REPORT "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("the admin probe printed no report: {stdout}"))
}

fn admin_probe_main(socket: PathBuf) {
    use spiffe_tunnel::identity::workload_api::ApiAddress;
    use spiffe_tunnel::proto::spire::api::agent::delegatedidentity::v1 as api;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = runtime.block_on(async {
        let channel = match ApiAddress::Unix(socket).channel(Default::default()).await {
            Ok(channel) => channel,
            Err(e) => return format!("cannot connect: {e}"),
        };
        let mut client = api::delegated_identity_client::DelegatedIdentityClient::new(channel);
        let request = api::SubscribeToX509sviDsRequest {
            selectors: Vec::new(),
            pid: std::process::id() as i32,
        };
        match client.subscribe_to_x509svi_ds(request).await {
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
            Ok(response) => match response.into_inner().message().await {
                Err(status) => format!("{:?}: {}", status.code(), status.message()),
                Ok(Some(m)) => format!("answered with {} SVIDs", m.x509_svids.len()),
                Ok(None) => "the stream ended".into(),
            },
        }
    });
    println!("\nADMIN-REPORT {answer}");
}

/// The body of a caller process; does nothing when not run as one.
pub fn child_main() {
    if let Some(socket) = std::env::var_os("ST_ADMIN_PROBE") {
        return admin_probe_main(PathBuf::from(socket));
    }
    let Ok(addr) = std::env::var("ST_CALLER_ADDR") else {
        return;
    };
    let var = |name: &str| std::env::var(name).ok();
    let uid: u32 = var("ST_CALLER_UID").unwrap().parse().unwrap();
    let concurrency: usize = var("ST_CALLER_CONCURRENCY").unwrap().parse().unwrap();
    let count: Option<usize> = var("ST_CALLER_COUNT").map(|c| c.parse().unwrap());
    let stop: Option<PathBuf> = var("ST_CALLER_STOP").map(PathBuf::from);
    let max = Duration::from_millis(var("ST_CALLER_MAX_MS").unwrap().parse().unwrap());
    let deadline = Instant::now() + max;
    let started = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (addr, stop) = (addr.clone(), stop.clone());
            let (started, ok, failed, errors) = (
                Arc::clone(&started),
                Arc::clone(&ok),
                Arc::clone(&failed),
                Arc::clone(&errors),
            );
            std::thread::spawn(move || loop {
                if Instant::now() >= deadline
                    || stop.as_ref().is_some_and(|s| s.exists())
                    || count.is_some_and(|c| started.fetch_add(1, Ordering::Relaxed) >= c)
                {
                    return;
                }
                match one_connection(&addr, uid) {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        let mut errors = errors.lock().unwrap();
                        if errors.len() < 10 {
                            errors.push(e);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let report = json!({
        "ok": ok.load(Ordering::Relaxed),
        "failed": failed.load(Ordering::Relaxed),
        "errors": *errors.lock().unwrap(),
    });
    println!("\nCALLER-REPORT {report}");
}

fn one_connection(addr: &str, uid: u32) -> Result<(), String> {
    let timeout = Some(Duration::from_secs(15));
    let exchange = |stream: &mut dyn ReadWrite| -> std::io::Result<Vec<u8>> {
        stream.write_all(format!("uid:{uid}\n").as_bytes())?;
        let mut got = Vec::new();
        stream.read_to_end(&mut got)?;
        Ok(got)
    };
    let got = match addr.strip_prefix("unix:") {
        Some(path) => {
            let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| e.to_string())?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            exchange(&mut s)
        }
        None => {
            let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
            s.set_read_timeout(timeout).map_err(|e| e.to_string())?;
            exchange(&mut s)
        }
    }
    .map_err(|e| e.to_string())?;
    if got == b"ok\n" {
        Ok(())
    } else {
        Err(format!("answer {:?}", String::from_utf8_lossy(&got)))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
