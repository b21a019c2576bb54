//! Resource access objects: where a ghost image is written to and read from.
//!
//! Kerrighed's `plug_resource_object` chose whether a ghost went to memory, disk or the network;
//! here that is the [`GhostWriter`] / [`GhostReader`] pair of traits. Export only ever appends
//! bytes and import only ever reads them in order, so a stream is enough for every destination,
//! including a TCP connection to a `krg listen` on another node (migration). The checkpoint store
//! adds its own implementation on top of the cluster client.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};

use crate::error::{GhostError, Result};

/// A destination for a ghost image. Bytes arrive in order; `finish` is called once at the end
/// and must make the image durable (or delivered) before it returns.
pub trait GhostWriter {
    /// Appends bytes to the image.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Completes the image (flush, fsync, half-close...).
    fn finish(&mut self) -> io::Result<()>;
    /// Offers `npages` pages at address `addr` that are unchanged since this process's previous
    /// image (write tracking). A writer that holds that image takes them from it and returns
    /// true; the export then neither reads nor streams them, and the trailer's checksum covers
    /// only the streamed bytes, so such a writer must check the contents itself when it
    /// re-assembles the image (see [`GhostReader::checks_content`]). The default takes nothing.
    fn reuse_pages(&mut self, _addr: u64, _npages: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Human-readable name of the destination, for error messages.
    fn describe(&self) -> String;
}

/// A source of a ghost image, read in order.
pub trait GhostReader {
    /// Reads up to `buf.len()` bytes; 0 means end of image.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Size of the whole image if the source knows it (lets import allocate once).
    fn size_hint(&self) -> Option<u64> {
        None
    }
    /// Human-readable name of the source, for error messages.
    fn describe(&self) -> String;
    /// The local file behind this source, if any: import maps it instead of reading it.
    fn as_file(&self) -> Option<&File> {
        None
    }
    /// Whether the source checked every byte it hands out against checksums of its own (the
    /// checkpoint store checks each page against its pack index). The image's trailer is then
    /// not checked, and the source may leave its checksum zero: an image re-assembled from
    /// pages taken out of earlier versions has no exporter's checksum over all of it.
    fn checks_content(&self) -> bool {
        false
    }
}

/// Reads exactly `buf.len()` bytes, returning `Ok(false)` on a clean end of stream before any
/// byte and an `UnexpectedEof` error on a partial read.
pub(crate) fn read_full(r: &mut dyn GhostReader, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Wraps an io error with the writer's name.
pub(crate) fn wio(w: &dyn GhostWriter, what: &str, e: io::Error) -> GhostError {
    GhostError::Io {
        what: what.to_string(),
        target: w.describe(),
        source: e,
    }
}

/// Wraps an io error with the reader's name.
pub(crate) fn rio(r: &dyn GhostReader, what: &str, e: io::Error) -> GhostError {
    GhostError::Io {
        what: what.to_string(),
        target: r.describe(),
        source: e,
    }
}

/// A ghost image in a local file. The file is created (truncated) on open and fsynced on
/// `finish`, so a checkpoint that returned is on disk.
pub struct FileWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Bytes handed to the file so far (some may still sit in `out`'s buffer).
    written: u64,
    /// Bytes whose writeback has been started.
    kicked: u64,
}

/// Writeback of the image is started every this many bytes: the disk then writes while the
/// rest of the process is read, and the fsync in `finish` waits only for the tail.
const WRITE_BEHIND: u64 = 32 << 20;

impl FileWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let f = File::create(&path).map_err(|e| GhostError::Io {
            what: "creating the image file (check the directory exists and is writable)".into(),
            target: format!("file {}", path.display()),
            source: e,
        })?;
        Ok(FileWriter {
            path,
            out: BufWriter::with_capacity(4 << 20, f),
            written: 0,
            kicked: 0,
        })
    }
}

impl GhostWriter for FileWriter {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.written += buf.len() as u64;
        let in_file = self.written - self.out.buffer().len() as u64;
        if in_file - self.kicked >= WRITE_BEHIND {
            use std::os::fd::AsRawFd;
            // SAFETY: sync_file_range on our own fd. SYNC_FILE_RANGE_WRITE only starts the
            // writeback of pages already written; a failure here (rare, e.g. EIO) is seen again
            // by the fsync in `finish`, which is what decides durability, so it is ignored.
            unsafe {
                libc::sync_file_range(
                    self.out.get_ref().as_raw_fd(),
                    self.kicked as libc::off64_t,
                    (in_file - self.kicked) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.kicked = in_file;
        }
        Ok(())
    }
    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// Reads a ghost image from a local file.
pub struct FileReader {
    path: PathBuf,
    file: File,
    len: u64,
}

impl FileReader {
    /// Opens `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let target = format!("file {}", path.display());
        let file = File::open(&path).map_err(|e| GhostError::Io {
            what: "opening the image file".into(),
            target: target.clone(),
            source: e,
        })?;
        let len = file
            .metadata()
            .map_err(|e| GhostError::Io {
                what: "stat of the image file".into(),
                target,
                source: e,
            })?
            .len();
        Ok(FileReader { path, file, len })
    }
}

impl GhostReader for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
    fn size_hint(&self) -> Option<u64> {
        Some(self.len)
    }
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// A ghost image kept in memory (Kerrighed's "memory checkpoint").
#[derive(Default)]
pub struct MemWriter {
    /// The image bytes written so far.
    pub buf: Vec<u8>,
}

impl GhostWriter for MemWriter {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(buf);
        Ok(())
    }
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "memory buffer".into()
    }
}

/// Reads a ghost image from memory.
pub struct MemReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> MemReader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        MemReader { buf, pos: 0 }
    }
}

impl GhostReader for MemReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.buf.len() - self.pos);
        buf[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
    fn size_hint(&self) -> Option<u64> {
        Some(self.buf.len() as u64)
    }
    fn describe(&self) -> String {
        "memory buffer".into()
    }
}

/// Outcome of an import on the receiving side of a migration, sent back on the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAck {
    /// The ghost is live on the remote node with this PID (as seen in its PID namespace).
    Restored(i32),
    /// The remote node refused or failed; the message says why.
    Failed(String),
}

/// Sends a ghost image over TCP to a `krg listen` (see [`serve_migration`]). `finish`
/// half-closes the stream; [`TcpWriter::wait_ack`] then says whether the remote import worked,
/// which is what decides if the original may be destroyed.
pub struct TcpWriter {
    peer: String,
    out: BufWriter<TcpStream>,
}

impl TcpWriter {
    /// Connects to `addr` (HOST:PORT).
    pub fn connect(addr: &str) -> Result<Self> {
        let s = TcpStream::connect(addr).map_err(|e| GhostError::Io {
            what: "connecting (is `krg listen` running there?)".into(),
            target: format!("tcp {addr}"),
            source: e,
        })?;
        let _ = s.set_nodelay(true);
        Ok(TcpWriter {
            peer: addr.to_string(),
            out: BufWriter::with_capacity(1 << 20, s),
        })
    }

    /// Waits for the receiver's verdict after `finish`.
    pub fn wait_ack(&mut self) -> Result<MigrationAck> {
        let mut msg = Vec::new();
        self.out
            .get_mut()
            .read_to_end(&mut msg)
            .map_err(|e| wio(self, "reading the migration ack", e))?;
        decode_ack(&msg).ok_or_else(|| GhostError::Io {
            what: "reading the migration ack".into(),
            target: self.describe(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "the receiver closed the connection without a valid answer (see its log)",
            ),
        })
    }
}

impl GhostWriter for TcpWriter {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)
    }
    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().shutdown(Shutdown::Write)
    }
    fn describe(&self) -> String {
        format!("tcp {}", self.peer)
    }
}

/// Receives a ghost image from a TCP connection.
pub struct TcpReader {
    peer: String,
    stream: TcpStream,
}

impl TcpReader {
    /// Wraps an accepted connection.
    pub fn new(stream: TcpStream) -> Self {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        TcpReader { peer, stream }
    }

    /// Sends the verdict back to the exporting side and closes the connection.
    pub fn send_ack(mut self, ack: &MigrationAck) -> Result<()> {
        let bytes = encode_ack(ack);
        self.stream
            .write_all(&bytes)
            .and_then(|_| self.stream.shutdown(Shutdown::Write))
            .map_err(|e| rio(&self, "sending the migration ack", e))
    }
}

impl GhostReader for TcpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
    fn describe(&self) -> String {
        format!("tcp from {}", self.peer)
    }
}

fn encode_ack(ack: &MigrationAck) -> Vec<u8> {
    match ack {
        MigrationAck::Restored(pid) => {
            let mut v = b"OK".to_vec();
            v.extend_from_slice(&pid.to_le_bytes());
            v
        }
        MigrationAck::Failed(msg) => {
            let mut v = b"ER".to_vec();
            v.extend_from_slice(msg.as_bytes());
            v
        }
    }
}

fn decode_ack(b: &[u8]) -> Option<MigrationAck> {
    match b.get(..2)? {
        b"OK" => {
            let pid: [u8; 4] = b.get(2..6)?.try_into().ok()?;
            Some(MigrationAck::Restored(i32::from_le_bytes(pid)))
        }
        b"ER" => Some(MigrationAck::Failed(
            String::from_utf8_lossy(&b[2..]).into_owned(),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_round_trip() {
        for a in [
            MigrationAck::Restored(42),
            MigrationAck::Failed("no".into()),
        ] {
            assert_eq!(decode_ack(&encode_ack(&a)), Some(a));
        }
        assert_eq!(decode_ack(b"XX"), None);
        assert_eq!(decode_ack(b"OK\x01"), None);
    }

    #[test]
    fn mem_round_trip() {
        let mut w = MemWriter::default();
        w.write_all(b"hello").unwrap();
        let mut r = MemReader::new(&w.buf);
        let mut b = [0u8; 8];
        assert_eq!(read_full(&mut r, &mut b).unwrap(), 5);
        assert_eq!(&b[..5], b"hello");
    }
}
