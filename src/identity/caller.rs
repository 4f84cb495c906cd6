//! Who a `present = "caller"` connection is for, as SPIRE's Delegated
//! Identity API is asked about it ([`CallerKey`]: a process by pid and start
//! time, or a uid), and the certificate resolver that presents that
//! caller's SVID. Kept apart from [`super::delegated`], which owns the
//! subscriptions, so the keying rules can be read (and tested) on their own.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;

use super::IdentityStore;
use crate::proto::spire::api::agent::delegatedidentity::v1 as api;
use crate::proto::spire::api::types::Selector;

/// A running process, told apart from a later one with the same pid by its
/// start time (clock ticks after boot, `/proc/PID/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcessId {
    /// The process now running under `pid`, if any can be read.
    pub fn read(pid: i32) -> Option<ProcessId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold
        // anything, spaces and ')' included: fields resume after the last ')'.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        // After ')': field 3 (state) is the first; start time is field 22.
        let start_time = rest.split_whitespace().nth(19)?.parse().ok()?;
        Some(ProcessId { pid, start_time })
    }

    /// True while the same process (not a successor with its pid) runs.
    pub fn still_running(&self) -> bool {
        ProcessId::read(self.pid) == Some(*self)
    }
}

/// Who opened a connection, as the kernel tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// The process, when it could be found.
    pub process: Option<ProcessId>,
}

impl Caller {
    /// What SPIRE is asked about: the process when known, else the uid.
    pub fn key(&self) -> CallerKey {
        match self.process {
            Some(process) => CallerKey::Process {
                process,
                uid: self.uid,
            },
            None => CallerKey::Uid(self.uid),
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.process.map(|p| p.pid)
    }
}

/// One subscription's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallerKey {
    /// Attested by SPIRE from the pid.
    Process { process: ProcessId, uid: u32 },
    /// Named by the selector `unix:uid:N`.
    Uid(u32),
}

impl std::fmt::Display for CallerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallerKey::Process { process, uid } => write!(f, "pid {} (uid {uid})", process.pid),
            CallerKey::Uid(uid) => write!(f, "uid {uid}"),
        }
    }
}

impl CallerKey {
    /// The subscription request that names this caller.
    pub(crate) fn request(&self) -> api::SubscribeToX509sviDsRequest {
        match self {
            CallerKey::Process { process, .. } => api::SubscribeToX509sviDsRequest {
                selectors: Vec::new(),
                pid: process.pid,
            },
            CallerKey::Uid(uid) => api::SubscribeToX509sviDsRequest {
                selectors: vec![Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{uid}"),
                }],
                pid: 0,
            },
        }
    }
}

/// The certificate a caller's connection presents: its current default
/// SVID, never an expired one.
#[derive(Debug)]
pub struct CallerResolver {
    store: Arc<IdentityStore>,
}

impl CallerResolver {
    pub fn new(store: Arc<IdentityStore>) -> Self {
        Self { store }
    }
}

impl rustls::client::ResolvesClientCert for CallerResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let identity = self.store.load()?;
        let svid = identity.default_svid()?;
        svid.is_valid_at(SystemTime::now())
            .then(|| Arc::clone(&svid.certified_key))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_reads_and_is_running() {
        let me = ProcessId::read(std::process::id() as i32).unwrap();
        assert!(me.still_running());
        let other = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !other.still_running(),
            "another start time is another process"
        );
        assert_eq!(ProcessId::read(i32::MAX), None);
    }

    #[test]
    fn requests_name_the_pid_or_the_uid_selector() {
        let process = ProcessId {
            pid: 42,
            start_time: 7,
        };
        let by_pid = CallerKey::Process { process, uid: 1000 }.request();
        assert_eq!((by_pid.pid, by_pid.selectors.len()), (42, 0));
        let by_uid = CallerKey::Uid(1000).request();
        assert_eq!(by_uid.pid, 0);
        assert_eq!(
            (
                by_uid.selectors[0].r#type.as_str(),
                by_uid.selectors[0].value.as_str()
            ),
            ("unix", "uid:1000")
        );
        assert_eq!(
            CallerKey::Process { process, uid: 1000 }.to_string(),
            "pid 42 (uid 1000)"
        );
    }
}
