//! Frames: `magic(4) version(2) reserved(2) body_len(4) checksum(16) body`.
//!
//! The checksum is the first 16 bytes of the blake3 hash of the body. The body
//! is an rkyv archive, validated with bytecheck before it is deserialised.
//! The same record format (checksum + archive, no magic) stores Raft entries
//! and state on disk, so bytes read back from disk get the same checks.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::limits::FRAME_BODY_BYTES_MAX;
use crate::rpc::PROTOCOL_VERSION;

pub const FRAME_MAGIC: [u8; 4] = *b"RWND";
pub const FRAME_HEADER_BYTES: usize = 28;
const CHECKSUM_BYTES: usize = 16;
/// A record begins with this many bytes of blake3 checksum over the rest.
pub const RECORD_CHECKSUM_BYTES: usize = CHECKSUM_BYTES;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame too short: {got} bytes, need at least {need}")]
    Truncated { got: usize, need: usize },
    #[error("not a rewind frame (magic {got:02x?})")]
    BadMagic { got: [u8; 4] },
    #[error("protocol version {got} is not supported (this build speaks {PROTOCOL_VERSION})")]
    BadVersion { got: u16 },
    #[error("frame body of {len} bytes exceeds the limit of {FRAME_BODY_BYTES_MAX}")]
    TooLarge { len: usize },
    #[error("frame checksum mismatch: the body is corrupt")]
    BadChecksum,
    #[error("frame body is not a valid archive: {0}")]
    BadArchive(String),
    #[error("trailing bytes after the frame: {extra}")]
    Trailing { extra: usize },
    #[error("record could not be encoded: {0}")]
    Encode(String),
}

/// A value that can be archived into a frame or record.
pub trait Encode:
    for<'a> rkyv::Serialize<rkyv::api::high::HighSerializer<AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>>
{
}
impl<T> Encode for T where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<AlignedVec, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >
{
}

/// A value that can be validated and decoded from a frame or record.
pub trait Decode:
    Sized +
    rkyv::Archive<
    Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
                  + rkyv::Deserialize<Self, rkyv::api::high::HighDeserializer<rancor::Error>>,
>
{
}
impl<T> Decode for T where
    T: rkyv::Archive<
        Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
                      + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
    >
{
}

/// The fixed-size head of a frame, parsed and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub body_len: usize,
    pub checksum: [u8; CHECKSUM_BYTES],
}

fn checksum(body: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let hash = blake3::hash(body);
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&hash.as_bytes()[..CHECKSUM_BYTES]);
    out
}

/// Archive a value.
pub fn to_archive<T: Encode>(value: &T) -> Result<AlignedVec, FrameError> {
    rkyv::to_bytes::<rancor::Error>(value).map_err(|e| FrameError::Encode(e.to_string()))
}

/// Validate and deserialise an archive. The bytes need not be aligned.
pub fn from_archive<T: Decode>(bytes: &[u8]) -> Result<T, FrameError> {
    // Heap buffers (frame bodies, RocksDB values) are usually aligned
    // already; copy only when they are not.
    let decode = |b: &[u8]| rkyv::from_bytes::<T, rancor::Error>(b).map_err(|e| FrameError::BadArchive(e.to_string()));
    if (bytes.as_ptr() as usize).is_multiple_of(ARCHIVE_ALIGN) {
        return decode(bytes);
    }
    let mut aligned = AlignedVec::<ARCHIVE_ALIGN>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    decode(&aligned)
}

/// The alignment archives are decoded at.
const ARCHIVE_ALIGN: usize = 16;

/// Encode a value as one frame.
pub fn encode_frame<T: Encode>(value: &T) -> Result<Vec<u8>, FrameError> {
    let body = to_archive(value)?;
    if body.len() > FRAME_BODY_BYTES_MAX {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parse and check a frame header. Rejects a body longer than the limit
/// before anything is read or allocated for it.
pub fn decode_header(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated { got: bytes.len(), need: FRAME_HEADER_BYTES });
    }
    let magic: [u8; 4] = bytes[0..4].try_into().expect("slice of 4");
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic { got: magic });
    }
    let version = u16::from_le_bytes(bytes[4..6].try_into().expect("slice of 2"));
    if version != PROTOCOL_VERSION {
        return Err(FrameError::BadVersion { got: version });
    }
    let body_len = u32::from_le_bytes(bytes[8..12].try_into().expect("slice of 4")) as usize;
    if body_len > FRAME_BODY_BYTES_MAX {
        return Err(FrameError::TooLarge { len: body_len });
    }
    let checksum = bytes[12..28].try_into().expect("slice of 16");
    Ok(FrameHeader { version, body_len, checksum })
}

/// Check a body against its header and decode it.
pub fn decode_body<T: Decode>(header: &FrameHeader, body: &[u8]) -> Result<T, FrameError> {
    if body.len() != header.body_len {
        return Err(FrameError::Truncated { got: body.len(), need: header.body_len });
    }
    if checksum(body) != header.checksum {
        return Err(FrameError::BadChecksum);
    }
    from_archive(body)
}

/// Decode exactly one whole frame from `bytes`.
pub fn decode_frame<T: Decode>(bytes: &[u8]) -> Result<T, FrameError> {
    let header = decode_header(bytes)?;
    let rest = &bytes[FRAME_HEADER_BYTES..];
    if rest.len() < header.body_len {
        return Err(FrameError::Truncated { got: bytes.len(), need: FRAME_HEADER_BYTES + header.body_len });
    }
    if rest.len() > header.body_len {
        return Err(FrameError::Trailing { extra: rest.len() - header.body_len });
    }
    decode_body(&header, rest)
}

/// Encode a value as an on-disk record: checksum followed by the archive.
pub fn encode_record<T: Encode>(value: &T) -> Result<Vec<u8>, FrameError> {
    let body = to_archive(value)?;
    let mut out = Vec::with_capacity(CHECKSUM_BYTES + body.len());
    out.extend_from_slice(&checksum(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Check and decode an on-disk record written by [`encode_record`].
pub fn decode_record<T: Decode>(bytes: &[u8]) -> Result<T, FrameError> {
    if bytes.len() < CHECKSUM_BYTES {
        return Err(FrameError::Truncated { got: bytes.len(), need: CHECKSUM_BYTES });
    }
    let (sum, body) = bytes.split_at(CHECKSUM_BYTES);
    if checksum(body) != sum {
        return Err(FrameError::BadChecksum);
    }
    from_archive(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventBatch, TimedEvent};
    use crate::rpc::{Request, Response};
    use proptest::prelude::*;

    fn sample() -> Request {
        Request::Append {
            batch: EventBatch {
                group: "cg".into(),
                client_id: 7,
                seq: 3,
                events: vec![TimedEvent {
                    time_ns: 42,
                    event: Event::Write { disk: "d0".into(), offset: 4096, data: vec![0xab; 4096] },
                }],
            },
        }
    }

    #[test]
    fn round_trip() {
        let frame = encode_frame(&sample()).unwrap();
        assert_eq!(decode_frame::<Request>(&frame).unwrap(), sample());
        let record = encode_record(&sample()).unwrap();
        assert_eq!(decode_record::<Request>(&record).unwrap(), sample());
    }

    fn check(mutate: impl Fn(&mut Vec<u8>), expected: impl Fn(&FrameError) -> bool) {
        let mut frame = encode_frame(&sample()).unwrap();
        mutate(&mut frame);
        let err = decode_frame::<Request>(&frame).unwrap_err();
        assert!(expected(&err), "unexpected error {err:?}");
    }

    #[test]
    fn bad_frames() {
        check(|f| f.truncate(10), |e| matches!(e, FrameError::Truncated { .. }));
        check(|f| f.truncate(f.len() - 1), |e| matches!(e, FrameError::Truncated { .. }));
        check(|f| f.push(0), |e| matches!(e, FrameError::Trailing { extra: 1 }));
        check(|f| f[0] = b'X', |e| matches!(e, FrameError::BadMagic { .. }));
        check(|f| f[4] = 9, |e| matches!(e, FrameError::BadVersion { got: 9 }));
        check(|f| f[8..12].copy_from_slice(&u32::MAX.to_le_bytes()), |e| matches!(e, FrameError::TooLarge { .. }));
        check(|f| *f.last_mut().unwrap() ^= 1, |e| matches!(e, FrameError::BadChecksum));
    }

    /// A frame with a correct header and checksum around any body.
    fn frame_around(body: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&FRAME_MAGIC);
        frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        frame.extend_from_slice(&0u16.to_le_bytes());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&checksum(body));
        frame.extend_from_slice(body);
        frame
    }

    #[test]
    fn valid_checksum_over_garbage_is_a_bad_archive() {
        let frame = frame_around(&[0xffu8; 64]);
        assert!(matches!(decode_frame::<Response>(&frame), Err(FrameError::BadArchive(_))));
    }

    #[test]
    fn decodes_aligned_and_unaligned_bytes_alike() {
        let body = to_archive(&sample()).unwrap();
        let mut shifted = vec![0u8; body.len() + 1];
        shifted[1..].copy_from_slice(&body);
        assert_eq!(from_archive::<Request>(&body).unwrap(), sample());
        assert_eq!(from_archive::<Request>(&shifted[1..]).unwrap(), sample());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<Request>(&bytes);
            let _ = decode_record::<Response>(&bytes);
        }

        #[test]
        fn garbage_with_valid_header_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<Request>(&frame_around(&body));
        }
    }
}

/// zstd's level for compressed appends: its fastest that still finds
/// repeats (a guest's text, zeroes inside blocks, repeated records).
pub const APPEND_ZSTD_LEVEL: i32 = 1;

/// A batch as a compressed append: `Request::AppendZstd`.
pub fn compress_batch(batch: &crate::event::EventBatch) -> Result<crate::rpc::Request, String> {
    let raw = encode_record(batch).map_err(|e| format!("encode a batch: {e}"))?;
    let data = zstd::bulk::compress(&raw, APPEND_ZSTD_LEVEL).map_err(|e| format!("compress a batch: {e}"))?;
    Ok(crate::rpc::Request::AppendZstd { raw_len: raw.len() as u64, data })
}

/// A compressed append back as `Request::Append`, checked: its size is
/// bounded before anything is decompressed, then its record's checksum
/// and archive are checked. Any other request passes through.
pub fn expand_append(request: crate::rpc::Request) -> Result<crate::rpc::Request, String> {
    match request {
        crate::rpc::Request::AppendZstd { raw_len, data } => {
            if raw_len > crate::limits::FRAME_BODY_BYTES_MAX as u64 {
                return Err(format!("a compressed append of {raw_len} bytes decompressed is over the {} limit", crate::limits::FRAME_BODY_BYTES_MAX));
            }
            let raw = zstd::bulk::decompress(&data, raw_len as usize).map_err(|e| format!("a compressed append does not decompress: {e}"))?;
            if raw.len() as u64 != raw_len {
                return Err(format!("a compressed append of {} bytes said {raw_len}", raw.len()));
            }
            let batch = decode_record(&raw).map_err(|e| format!("a compressed append is damaged: {e}"))?;
            Ok(crate::rpc::Request::Append { batch })
        }
        other => Ok(other),
    }
}

#[cfg(test)]
mod append_zstd_tests {
    use super::*;
    use crate::event::{Event, EventBatch, TimedEvent};
    use crate::rpc::Request;

    #[test]
    fn a_compressed_append_comes_back_whole_and_a_bad_one_is_refused() {
        let batch = EventBatch { group: "g".into(), client_id: 1, seq: 1, events: vec![TimedEvent { time_ns: 1, event: Event::Write { disk: "d".into(), offset: 0, data: vec![7; 65536] } }] };
        let Request::AppendZstd { raw_len, data } = compress_batch(&batch).unwrap() else { panic!("not compressed") };
        assert!(data.len() < 1024, "64 KiB of one byte compresses: {}", data.len());
        assert_eq!(expand_append(Request::AppendZstd { raw_len, data: data.clone() }).unwrap(), Request::Append { batch });
        assert!(expand_append(Request::AppendZstd { raw_len: 1 << 40, data: data.clone() }).unwrap_err().contains("over"));
        assert!(expand_append(Request::AppendZstd { raw_len: raw_len - 1, data: data.clone() }).is_err());
        assert!(expand_append(Request::AppendZstd { raw_len, data: vec![1, 2, 3] }).is_err());
        assert_eq!(expand_append(Request::Status).unwrap(), Request::Status);
    }
}
