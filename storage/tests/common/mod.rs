//! Test harness: starts chunk servers in-process on loopback with real data directories, and
//! a small raw client (the real client lives in client/).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kerfs_proto::auth::{ClientAuth, ClusterKey};
use kerfs_proto::chunk_client::ChunkClient;
use kerfs_proto::chunk_write_frame::Frame;
use kerfs_proto::{
    ChunkChainReply, ChunkReadRequest, ChunkServerInfoRequest, ChunkWriteFrame, ChunkWriteHeader,
};
use kerfs_storage::{ServerConfig, StorageError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::Status;

pub type Client = ChunkClient<InterceptedService<Channel, ClientAuth>>;

pub const CLUSTER: &str = "test-cluster";

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A running chunk server.
pub struct Node {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    pub metrics: SocketAddr,
    pub key: ClusterKey,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), StorageError>>>,
}

pub fn config(id: u64, cluster: &str, dir: &Path, key: &ClusterKey) -> ServerConfig {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut c = ServerConfig::new(id, cluster, listen, dir.to_owned(), key.clone());
    c.metrics_listen = Some(format!("127.0.0.1:{}", free_port()).parse().expect("addr"));
    c.forward_timeout = Duration::from_secs(5);
    c.scrub_interval = None;
    c
}

impl Node {
    pub async fn start(id: u64, dir: &Path, key: &ClusterKey) -> Node {
        Node::start_with(config(id, CLUSTER, dir, key)).await
    }

    pub async fn start_with(config: ServerConfig) -> Node {
        let (tx, rx) = oneshot::channel();
        let addr = config.advertise.clone();
        let metrics = config.metrics_listen.expect("metrics addr");
        let (id, dir, key) = (
            config.server_id,
            config.data_dir.clone(),
            config.key.clone(),
        );
        let handle = tokio::spawn(kerfs_storage::run(config, async move {
            let _ = rx.await;
        }));
        let node = Node {
            id,
            addr,
            dir,
            metrics,
            key,
            stop: Some(tx),
            handle: Some(handle),
        };
        // Wait until it answers.
        for _ in 0..100 {
            if let Ok(mut c) = node.try_client().await {
                if c.server_info(ChunkServerInfoRequest {}).await.is_ok() {
                    return node;
                }
            }
            if node.handle.as_ref().is_some_and(|h| h.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("chunk server {id} did not come up");
    }

    pub async fn try_client(&self) -> Result<Client, tonic::transport::Error> {
        connect(&self.addr, &self.key).await
    }

    pub async fn client(&self) -> Client {
        self.try_client().await.expect("connect to chunk server")
    }

    /// Stops the server cleanly and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), StorageError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(h) => h.await.expect("server task"),
            None => Ok(()),
        }
    }

    pub fn data_path(&self, chunk: u64) -> PathBuf {
        kerfs_storage::store::chunk_data_path(&self.dir, chunk)
    }

    pub async fn metrics_page(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics)
            .await
            .expect("connect metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read metrics");
        out
    }

    pub async fn metric(&self, name: &str) -> u64 {
        let page = self.metrics_page().await;
        page.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{page}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

pub async fn connect(addr: &str, key: &ClusterKey) -> Result<Client, tonic::transport::Error> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    Ok(ChunkClient::with_interceptor(ch, key.client_auth())
        .max_decoding_message_size(kerfs_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(kerfs_proto::MAX_MESSAGE_BYTES))
}

pub fn header(chunk: u64, version: u64, offset: u64, chain: &[&str]) -> ChunkWriteHeader {
    ChunkWriteHeader {
        chunk_id: chunk,
        version,
        offset,
        length: 0,
        chain: chain.iter().map(|s| s.to_string()).collect(),
        sync: true,
        create: true,
        shard_index: 0,
    }
}

/// Writes `data` after `header` in frames of at most 1 MiB.
pub async fn write(
    c: &mut Client,
    mut header: ChunkWriteHeader,
    data: &[u8],
) -> Result<ChunkChainReply, Status> {
    header.length = data.len() as u64;
    let mut frames = vec![ChunkWriteFrame {
        frame: Some(Frame::Header(header)),
    }];
    for piece in data.chunks(1 << 20) {
        frames.push(ChunkWriteFrame {
            frame: Some(Frame::Data(piece.to_vec())),
        });
    }
    c.write(tokio_stream_iter(frames))
        .await
        .map(|r| r.into_inner())
}

fn tokio_stream_iter(
    frames: Vec<ChunkWriteFrame>,
) -> impl futures_core_stream::Stream<Item = ChunkWriteFrame> {
    futures_core_stream::iter(frames)
}

mod futures_core_stream {
    pub use futures::stream::{iter, Stream};
}

/// Reads a range; checks frame offsets are contiguous.
pub async fn read(
    c: &mut Client,
    chunk: u64,
    version: u64,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>, Status> {
    let mut s = c
        .read(ChunkReadRequest {
            chunk_id: chunk,
            version,
            offset,
            length,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(f) = s.message().await? {
        assert_eq!(f.offset, offset + out.len() as u64, "frames out of order");
        assert!(f.data.len() <= 1 << 20, "frame larger than 1 MiB");
        out.extend_from_slice(&f.data);
    }
    Ok(out)
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}
