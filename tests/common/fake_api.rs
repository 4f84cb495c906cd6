#![allow(dead_code)]
//! A scripted Workload API server for tests that need answers no honest
//! agent gives: malformed responses, chosen status codes, federated bundles
//! coming and going. The test sets the current reply; every open stream
//! receives it at once, and new streams start with it.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use spiffe_tunnel::proto::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use spiffe_tunnel::proto::*;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use super::certs::Leaf;

/// What the fake agent says to FetchX509SVID.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Nothing yet: streams stay open and silent.
    Silent,
    Svids(X509svidResponse),
    /// Ends every stream (and answers new ones) with this status.
    Fail(Code, String),
}

pub struct FakeWorkloadApi {
    pub socket: PathBuf,
    reply: watch::Sender<Reply>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

struct Service {
    reply: watch::Receiver<Reply>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;
    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        if request
            .metadata()
            .get(SECURITY_HEADER)
            .map(|v| v.as_bytes())
            != Some(b"true")
        {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let mut reply = self.reply.clone();
        if let Reply::Fail(code, message) = reply.borrow_and_update().clone() {
            return Err(Status::new(code, message));
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut current = reply.borrow().clone();
            loop {
                let item = match current {
                    Reply::Silent => None,
                    Reply::Svids(r) => Some(Ok(r)),
                    Reply::Fail(code, message) => Some(Err(Status::new(code, message))),
                };
                let last = matches!(item, Some(Err(_)));
                if let Some(item) = item {
                    if tx.send(item).await.is_err() || last {
                        return;
                    }
                }
                if reply.changed().await.is_err() {
                    return;
                }
                current = reply.borrow_and_update().clone();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

impl FakeWorkloadApi {
    /// Serves on `dir/api.sock`.
    pub async fn start(dir: &Path, reply: Reply) -> Self {
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (reply_tx, reply_rx) = watch::channel(reply);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(Service { reply: reply_rx }))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Self {
            socket,
            reply: reply_tx,
            shutdown: Some(stop_tx),
        }
    }

    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn set(&self, reply: Reply) {
        self.reply.send_replace(reply);
    }
}

impl Drop for FakeWorkloadApi {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Concatenated DER, the Workload API's encoding of chains and bundles.
pub fn der_concat<'a>(
    certs: impl IntoIterator<Item = &'a rustls_pki_types::CertificateDer<'a>>,
) -> Vec<u8> {
    certs
        .into_iter()
        .flat_map(|c| c.as_ref().to_vec())
        .collect()
}

/// PKCS#8 DER of a PEM key.
pub fn key_der(key_pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .unwrap()
        .secret_der()
        .to_vec()
}

/// One X509SVID entry for `leaf` with `bundle` (DER certs) as its trust
/// domain's bundle.
pub fn svid_entry(leaf: &Leaf, bundle: &[rustls_pki_types::CertificateDer<'static>]) -> X509svid {
    X509svid {
        spiffe_id: leaf.id.clone(),
        x509_svid: der_concat(&leaf.chain_der),
        x509_svid_key: key_der(&leaf.key_pem),
        bundle: der_concat(bundle),
        hint: String::new(),
    }
}
