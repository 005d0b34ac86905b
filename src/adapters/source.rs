//! The source of a module's bytes: its files (confined to one folder level), their change
//! fingerprint, their total size, and one read that both hashes them into the module's version
//! and keeps the bytes the loader will parse.
//!
//! Invariants: the version names exactly the bytes parsed (no second read, no window in which a
//! swapped file is parsed under the old version); the fingerprint (size, mtime, inode of every
//! file) changes whenever a file is swapped or edited; read buffers are recycled through a small
//! bounded pool.
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use super::error::AdapterError;

/// Opens `path` for reading if it is a regular file (symlinks followed), and refuses FIFOs,
/// sockets and devices without blocking: the open uses `O_NONBLOCK` (a FIFO would otherwise wait
/// for a writer forever, and with it every request waiting on the same load), and the kind is
/// checked on the opened descriptor, so a swap between a check and the open cannot slip one
/// through. Every file a module or recipe names is opened here.
pub fn open_regular(path: &Path) -> Result<std::fs::File, AdapterError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| AdapterError::io(path, "cannot open", e);
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io)?;
    let kind = file.metadata().map_err(io)?.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() { "a folder" } else { "not a regular file (a FIFO, socket or device)" };
        return Err(AdapterError::Unsupported { path: path.into(), reason: format!("{what}: only regular files are read") });
    }
    Ok(file)
}

/// The whole of a regular file (see [`open_regular`]).
pub fn read_regular(path: &Path) -> Result<Vec<u8>, AdapterError> {
    use std::io::Read;
    let mut file = open_regular(path)?;
    let mut bytes = Vec::with_capacity(file.metadata().map(|m| m.len() as usize).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(|e| AdapterError::io(path, "cannot read", e))?;
    Ok(bytes)
}

/// A regular file as UTF-8 text (see [`open_regular`]).
pub fn read_regular_to_string(path: &Path) -> Result<String, AdapterError> {
    String::from_utf8(read_regular(path)?)
        .map_err(|e| AdapterError::Malformed { path: path.into(), reason: format!("not UTF-8 text: {e}") })
}

/// The files of a module, sorted: the path itself, or the regular files (symlinks followed) directly
/// inside its folder.
pub fn module_files(path: &Path) -> Result<Vec<PathBuf>, AdapterError> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let io = |e: std::io::Error| AdapterError::io(path, "cannot list", e);
    let mut files = Vec::new();
    for e in std::fs::read_dir(path).map_err(io)? {
        let p = e.map_err(io)?.path();
        if p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Size, mtime and inode of every file of a module: changes when a file is swapped or edited.
pub fn fingerprint(path: &Path) -> Result<String, AdapterError> {
    use std::os::unix::fs::MetadataExt;
    let io = |p: &Path, e: std::io::Error| AdapterError::io(p, "cannot stat", e);
    let files = module_files(path)?;
    let mut parts = Vec::with_capacity(files.len());
    for f in files {
        let m = std::fs::metadata(&f).map_err(|e| io(&f, e))?;
        let mtime = m.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
        parts.push(format!("{}:{}:{}:{}", f.file_name().and_then(|n| n.to_str()).unwrap_or("?"), m.len(), mtime, m.ino()));
    }
    Ok(parts.join("|"))
}

/// The first 8 bytes of SHA-256, hex: cache keys and derived versions.
pub fn short_hash(b: &[u8]) -> String {
    hex::encode(&Sha256::digest(b)[..8])
}

/// Total size of a module's files.
pub fn module_bytes(path: &Path) -> Result<u64, AdapterError> {
    let mut total = 0;
    // Symlinks followed: a linked file counts with its real size.
    for f in module_files(path)? {
        total += std::fs::metadata(&f).map_err(|e| AdapterError::io(&f, "cannot stat", e))?.len();
    }
    Ok(total)
}

/// BLAKE3 over the module's files (names and contents, sorted by name): the module's version.
/// BLAKE3 rather than SHA-256 because it hashes several times faster on the cold-load path while
/// staying a cryptographic hash.
pub fn content_hash(path: &Path) -> Result<String, AdapterError> {
    ModuleBytes::read(path, |_| false)?.version()
}

/// A module's files read once for loading: the bytes of the files the loader will parse, and the
/// version hash over all files ([`ModuleBytes::version`]), which covers exactly the bytes parsed
/// (no second read, and no window in which a swapped file is parsed under the old version).
pub struct ModuleBytes {
    /// The hash over the files before the first kept one.
    hashed: blake3::Hasher,
    /// The files from the first kept one on, in name order: hashed by [`ModuleBytes::version`]
    /// (kept ones from their bytes, others read then), so a loader can hash while it parses.
    rest: Vec<std::path::PathBuf>,
    kept: std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>,
}

impl ModuleBytes {
    /// Reads every file of the module and keeps the bytes of the files `keep` selects; the files
    /// before the first kept one are hashed now, the others by [`ModuleBytes::version`].
    pub fn read(path: &Path, keep: impl Fn(&Path) -> bool) -> Result<Self, AdapterError> {
        use std::io::Read;
        let mut hashed = blake3::Hasher::new();
        let (mut rest, mut kept) = (Vec::new(), std::collections::BTreeMap::new());
        for f in module_files(path)? {
            if keep(&f) {
                let mut file = open_regular(&f)?;
                let mut bytes = take_buffer(file.metadata().map(|m| m.len() as usize).unwrap_or(0));
                file.read_to_end(&mut bytes).map_err(|e| AdapterError::io(&f, "cannot read", e))?;
                kept.insert(f.clone(), bytes);
                rest.push(f);
            } else if rest.is_empty() {
                hash_file(&mut hashed, &f)?;
            } else {
                rest.push(f);
            }
        }
        Ok(Self { hashed, rest, kept })
    }

    /// The module's version: BLAKE3 over (name length, name, contents) of every file in name
    /// order, first 8 bytes in hex. The kept files are hashed from the bytes kept; others after
    /// the first kept one are read now.
    pub fn version(&self) -> Result<String, AdapterError> {
        let mut h = self.hashed.clone();
        for f in &self.rest {
            match self.kept.get(f) {
                Some(bytes) => {
                    hash_name(&mut h, f);
                    h.update_rayon(bytes);
                }
                None => hash_file(&mut h, f)?,
            }
        }
        Ok(hex::encode(&h.finalize().as_bytes()[..8]))
    }

    /// The bytes of `file`, if they were kept.
    pub fn get(&self, file: &Path) -> Option<&[u8]> {
        self.kept.get(file).map(|v| v.as_slice())
    }
}

/// The length and bytes of `f`'s file name, as the version hashes them before its contents.
fn hash_name(h: &mut blake3::Hasher, f: &Path) {
    let name = f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name);
}

/// Hashes `f`'s name and contents, streamed in blocks of up to 4 MB (BLAKE3 then hashes many
/// chunks at once: SIMD, and both cores); a small file gets a buffer of its own size.
fn hash_file(h: &mut blake3::Hasher, f: &Path) -> Result<(), AdapterError> {
    use std::io::Read;
    hash_name(h, f);
    let mut file = open_regular(f)?;
    let len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let mut buf = vec![0u8; len.clamp(1, 4 << 20)];
    loop {
        let n = file.read(&mut buf).map_err(|e| AdapterError::io(f, "cannot read", e))?;
        if n == 0 {
            return Ok(());
        }
        h.update_rayon(&buf[..n]);
    }
}

impl Drop for ModuleBytes {
    fn drop(&mut self) {
        for (_, b) in std::mem::take(&mut self.kept) {
            give_buffer(b);
        }
    }
}

/// Read buffers kept between module loads: a fresh 10 MB buffer costs more in page faults than
/// reading the file into it (measured 4.5 ms vs about 1.5 ms for a 9.8 MB LoRA).
static READ_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// At most this many buffers of at most this many bytes are kept.
const KEPT_BUFFERS: usize = 2;
const KEPT_BUFFER_BYTES: usize = 64 << 20;

fn take_buffer(len: usize) -> Vec<u8> {
    let mut pool = READ_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = match pool.iter().position(|b| b.capacity() >= len) {
        Some(i) => pool.swap_remove(i),
        None => pool.pop().unwrap_or_default(),
    };
    drop(pool);
    b.clear();
    b.reserve(len);
    b
}

fn give_buffer(b: Vec<u8>) {
    if b.capacity() <= KEPT_BUFFER_BYTES {
        let mut pool = READ_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < KEPT_BUFFERS {
            pool.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only regular files are read, and how a read fails decides the gRPC code: a missing file is
    /// NOT_FOUND (`adapter_io`), an unreadable one INTERNAL (`adapter_unreadable`), a FIFO or a
    /// folder `adapter_unsupported`, each answered at once.
    #[test]
    fn read_regular_refuses_without_blocking_and_classifies_failures() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.safetensors");
        assert_eq!(read_regular(&missing).unwrap_err().code(), "adapter_io");
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let e = read_regular(&looped).unwrap_err();
        assert_eq!(e.code(), "adapter_unreadable", "{e}");
        assert_eq!(read_regular(dir.path()).unwrap_err().code(), "adapter_unsupported");
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(read_regular(&fifo).map(|_| ()).map_err(|e| e.code())).unwrap());
        let got = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("reading a FIFO must not block");
        assert_eq!(got, Err("adapter_unsupported"));
        let file = dir.path().join("ok.bin");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(read_regular(&file).unwrap(), b"abc");
    }

    /// A module's version is the same whichever files are kept (hashed later from their bytes,
    /// with every file after the first kept one) or only hashed (streamed), and is BLAKE3 over
    /// (name length, name, contents) per file: checked against a hash computed here in one
    /// piece, for an empty file, a small one and one of several MB; the kept bytes are the file's.
    #[test]
    fn kept_and_streamed_files_hash_to_the_same_version() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(5 << 20) / 2 + 12_345).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(dir.path().join("a_config.json"), b"{}").unwrap();
        std::fs::write(dir.path().join("b_empty"), b"").unwrap();
        std::fs::write(dir.path().join("c_big.safetensors"), &big).unwrap();
        let mut want = blake3::Hasher::new();
        for (name, data) in [("a_config.json", &b"{}"[..]), ("b_empty", &b""[..]), ("c_big.safetensors", &big[..])] {
            want.update(&(name.len() as u64).to_le_bytes());
            want.update(name.as_bytes());
            want.update(data);
        }
        let want = hex::encode(&want.finalize().as_bytes()[..8]);
        let streamed = ModuleBytes::read(dir.path(), |_| false).unwrap().version().unwrap();
        let all_kept = ModuleBytes::read(dir.path(), |_| true).unwrap();
        let first_kept = ModuleBytes::read(dir.path(), |f| f.ends_with("b_empty")).unwrap().version().unwrap();
        let last_kept = ModuleBytes::read(dir.path(), |f| f.ends_with("c_big.safetensors")).unwrap().version().unwrap();
        assert_eq!([&streamed, &all_kept.version().unwrap(), &first_kept, &last_kept], [&want; 4]);
        let kept = all_kept;
        assert_eq!(kept.get(&dir.path().join("c_big.safetensors")), Some(&big[..]));
        assert_eq!(kept.get(&dir.path().join("b_empty")), Some(&b""[..]));
    }
}
