//! Connections to chunk servers and the per-chunk RPCs of the data path (write stream, read
//! stream, set-version, truncate), with timeouts and a classification of the failures the
//! file layer must tell apart (see the error list at the top of proto/proto/chunk.proto).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use kerfs_proto::auth::{ClientAuth, ClusterKey};
use kerfs_proto::chunk_client::ChunkClient;
use kerfs_proto::chunk_write_frame::Frame;
use kerfs_proto::{
    ChunkChainReply, ChunkReadRequest, ChunkSetVersionRequest, ChunkTruncateRequest,
    ChunkWriteFrame, ChunkWriteHeader, MAX_MESSAGE_BYTES,
};

type Grpc = ChunkClient<tonic::service::interceptor::InterceptedService<Channel, ClientAuth>>;

/// Largest data frame a chunk server accepts in a write stream.
pub const FRAME_BYTES: usize = 1024 * 1024;

/// Why one RPC to one chunk server failed, reduced to what the caller does about it.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    /// The server holds a newer version than we asked for: our chunk table is out of date.
    pub fn is_newer(&self) -> bool {
        self.code == Code::FailedPrecondition && self.message.contains("newer")
    }

    pub fn is_no_space(&self) -> bool {
        self.code == Code::ResourceExhausted
    }

    pub fn is_auth(&self) -> bool {
        matches!(self.code, Code::Unauthenticated | Code::PermissionDenied)
    }

    fn timeout(what: &str, after: Duration) -> RpcError {
        RpcError {
            code: Code::DeadlineExceeded,
            message: format!("{what}: no answer within {after:?}"),
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl From<tonic::Status> for RpcError {
    fn from(s: tonic::Status) -> RpcError {
        RpcError {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// A lazily connected channel per chunk server address, shared by every file handle of a
/// client (tonic channels multiplex concurrent calls over HTTP/2).
pub struct ChunkPool {
    key: ClusterKey,
    clients: Mutex<HashMap<String, Grpc>>,
    /// Bound on one unary call or on one whole read/write stream of at most a chunk's worth
    /// of data; a dead or hung server must not hang a flush forever.
    pub rpc_timeout: Duration,
}

impl ChunkPool {
    pub fn new(key: ClusterKey) -> Arc<ChunkPool> {
        Arc::new(ChunkPool {
            key,
            clients: Mutex::new(HashMap::new()),
            rpc_timeout: Duration::from_secs(60),
        })
    }

    fn client(&self, addr: &str) -> Result<Grpc, RpcError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| RpcError {
                code: Code::InvalidArgument,
                message: format!("bad chunk server address {addr:?}: {e}"),
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // Large streams: let HTTP/2 windows grow instead of stalling at 64 KiB.
            .http2_adaptive_window(true);
        let grpc = ChunkClient::with_interceptor(endpoint.connect_lazy(), self.key.client_auth())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        clients.insert(addr.to_string(), grpc.clone());
        Ok(grpc)
    }

    /// Streams `data` to `addr` at `header.offset` (header.length is filled in here); the
    /// server forwards it down `header.chain`.
    pub async fn write(
        &self,
        addr: &str,
        mut header: ChunkWriteHeader,
        data: bytes::Bytes,
    ) -> Result<ChunkChainReply, RpcError> {
        let mut grpc = self.client(addr)?;
        header.length = data.len() as u64;
        let mut frames = Vec::with_capacity(1 + data.len() / FRAME_BYTES);
        frames.push(ChunkWriteFrame {
            frame: Some(Frame::Header(header)),
        });
        let mut pos = 0;
        while pos < data.len() {
            let end = (pos + FRAME_BYTES).min(data.len());
            frames.push(ChunkWriteFrame {
                frame: Some(Frame::Data(data.slice(pos..end).to_vec())),
            });
            pos = end;
        }
        let call = grpc.write(tokio_stream::iter(frames));
        match tokio::time::timeout(self.rpc_timeout, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.into()),
            Err(_) => Err(RpcError::timeout(addr, self.rpc_timeout)),
        }
    }

    /// Reads `length` bytes at `offset` into a buffer of exactly `length` bytes: what the
    /// server does not send (past the chunk's length) stays zero, as file semantics want.
    pub async fn read(
        &self,
        addr: &str,
        chunk_id: u64,
        version: u64,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>, RpcError> {
        let mut grpc = self.client(addr)?;
        let req = ChunkReadRequest {
            chunk_id,
            version,
            offset,
            length: length as u64,
        };
        let fut = async move {
            let mut stream = grpc.read(req).await?.into_inner();
            let mut out = vec![0u8; length];
            while let Some(frame) = stream.message().await? {
                // Frames are placed by their own offset; a server that sent something outside
                // the asked range is broken, and we refuse rather than index out of bounds.
                let start = frame.offset.checked_sub(offset).map(|s| s as usize);
                match start {
                    Some(s) if s.saturating_add(frame.data.len()) <= length => {
                        out[s..s + frame.data.len()].copy_from_slice(&frame.data);
                    }
                    _ => {
                        return Err(tonic::Status::internal(format!(
                            "{addr} sent a frame at {} (+{}) outside the range asked ({offset}+{length})",
                            frame.offset,
                            frame.data.len()
                        )))
                    }
                }
            }
            Ok::<_, tonic::Status>(out)
        };
        match tokio::time::timeout(self.rpc_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(s)) => Err(s.into()),
            Err(_) => Err(RpcError::timeout(addr, self.rpc_timeout)),
        }
    }

    /// What the server holds of one chunk (version, length).
    pub async fn stat(
        &self,
        addr: &str,
        chunk_id: u64,
    ) -> Result<kerfs_proto::ChunkInfo, RpcError> {
        let mut grpc = self.client(addr)?;
        let req = kerfs_proto::ChunkStatRequest { chunk_id };
        match tokio::time::timeout(self.rpc_timeout, grpc.stat(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.into()),
            Err(_) => Err(RpcError::timeout(addr, self.rpc_timeout)),
        }
    }

    /// Removes a chunk (with `max_version` 0: whatever version it has).
    pub async fn delete(
        &self,
        addr: &str,
        chunk_id: u64,
        max_version: u64,
    ) -> Result<bool, RpcError> {
        let mut grpc = self.client(addr)?;
        let req = kerfs_proto::ChunkDeleteRequest {
            chunk_id,
            max_version,
        };
        match tokio::time::timeout(self.rpc_timeout, grpc.delete(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner().existed),
            Ok(Err(s)) => Err(s.into()),
            Err(_) => Err(RpcError::timeout(addr, self.rpc_timeout)),
        }
    }

    pub async fn set_version(
        &self,
        addr: &str,
        req: ChunkSetVersionRequest,
    ) -> Result<ChunkChainReply, RpcError> {
        let mut grpc = self.client(addr)?;
        match tokio::time::timeout(self.rpc_timeout, grpc.set_version(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.into()),
            Err(_) => Err(RpcError::timeout(addr, self.rpc_timeout)),
        }
    }

    pub async fn truncate(
        &self,
        addr: &str,
        req: ChunkTruncateRequest,
    ) -> Result<ChunkChainReply, RpcError> {
        let mut grpc = self.client(addr)?;
        match tokio::time::timeout(self.rpc_timeout, grpc.truncate(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.into()),
            Err(_) => Err(RpcError::timeout(addr, self.rpc_timeout)),
        }
    }
}
