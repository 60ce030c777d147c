//! Files an operator names (the rule file, TLS certificates and keys): read
//! only when they are regular files, and only up to a size. Opening a FIFO
//! with no writer blocks, and `/dev/zero` never ends: either would hang a
//! reload, a `vigil check` or the start, or fill the memory.

use std::io::{self, Read};
use std::path::Path;

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("not a regular file (a {0})")]
    NotAFile(&'static str),
    #[error("over the {} MiB {what} may have", .max >> 20)]
    TooLarge { max: u64, what: &'static str },
}

/// The bytes of `path`, a regular file (never opened otherwise) of at most
/// `max` bytes; `what` names such a file in the error.
pub fn read(path: &Path, max: u64, what: &'static str) -> Result<Vec<u8>, ReadError> {
    let kind = std::fs::metadata(path)?.file_type();
    if !kind.is_file() {
        return Err(ReadError::NotAFile(file_kind(&kind)));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(ReadError::TooLarge { max, what });
    }
    Ok(bytes)
}

fn file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}
