//! The NBD protocol, as pure functions over bytes: the fixed newstyle
//! handshake, option haggling (`GO`, `INFO`, `LIST`, `STRUCTURED_REPLY`,
//! `ABORT`, legacy `EXPORT_NAME`), transmission requests, and simple and
//! structured replies. No I/O: the tap's server feeds it bytes.

/// "NBDMAGIC"
pub const INIT_PASSWD: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT"
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// Errors, as NBD numbers them (the Linux errno values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload a client may send during haggling.
pub const OPTION_BYTES_MAX: u32 = 4096;
/// Largest READ or WRITE a client may send in one request, 32 MiB; larger
/// requests are refused with EOVERFLOW (reads) or the connection is closed
/// (writes, whose payload cannot be skipped safely).
pub const REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Block sizes advertised with NBD_INFO_BLOCK_SIZE.
pub const BLOCK_PREFERRED: u32 = 4096;

pub const REQUEST_HEADER_BYTES: usize = 28;
pub const OPTION_HEADER_BYTES: usize = 16;

/// The server's first bytes.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&INIT_PASSWD.to_be_bytes());
    out[8..16].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("client flags {0:#x} include unknown bits")]
    BadClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("option payload of {0} bytes is over the limit of {OPTION_BYTES_MAX}")]
    OptionTooLarge(u32),
    #[error("bad request magic {0:#x}")]
    BadRequestMagic(u32),
    #[error("malformed option data: {0}")]
    BadOptionData(&'static str),
}

/// Checks the client's flags after the greeting.
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<u32, ProtocolError> {
    let flags = u32::from_be_bytes(bytes);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::BadClientFlags(flags));
    }
    Ok(flags)
}

/// An option header: which option and how many bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, ProtocolError> {
    let magic = u64::from_be_bytes(bytes[..8].try_into().expect("8"));
    if magic != OPTS_MAGIC {
        return Err(ProtocolError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(bytes[8..12].try_into().expect("4"));
    let len = u32::from_be_bytes(bytes[12..16].try_into().expect("4"));
    if len > OPTION_BYTES_MAX {
        return Err(ProtocolError::OptionTooLarge(len));
    }
    Ok(OptionHeader { option, len })
}

/// The data of NBD_OPT_GO and NBD_OPT_INFO: an export name and the
/// information items the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    pub name: String,
    pub info: Vec<u16>,
}

pub fn parse_go(data: &[u8]) -> Result<GoRequest, ProtocolError> {
    let take = |from: usize, n: usize| data.get(from..from + n).ok_or(ProtocolError::BadOptionData("too short"));
    let name_len = u32::from_be_bytes(take(0, 4)?.try_into().expect("4")) as usize;
    let name = std::str::from_utf8(take(4, name_len)?).map_err(|_| ProtocolError::BadOptionData("name is not UTF-8"))?;
    let count = u16::from_be_bytes(take(4 + name_len, 2)?.try_into().expect("2")) as usize;
    let rest = take(6 + name_len, count * 2)?;
    if data.len() != 6 + name_len + count * 2 {
        return Err(ProtocolError::BadOptionData("length does not match its contents"));
    }
    let info = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(GoRequest { name: name.to_string(), info })
}

/// One option reply.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// NBD_INFO_BLOCK_SIZE: the smallest block a client may address (the
/// disk's sector size for the tap), the preferred one, and the largest
/// request.
pub fn info_block_size(min: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, BLOCK_PREFERRED.max(min), max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut d = INFO_NAME.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn info_description(text: &str) -> Vec<u8> {
    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
    d.extend_from_slice(text.as_bytes());
    d
}

/// What the server sends after NBD_OPT_EXPORT_NAME.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn parse_request(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<Request, ProtocolError> {
    let magic = u32::from_be_bytes(bytes[..4].try_into().expect("4"));
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes(bytes[4..6].try_into().expect("2")),
        kind: u16::from_be_bytes(bytes[6..8].try_into().expect("2")),
        handle: u64::from_be_bytes(bytes[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(bytes[16..24].try_into().expect("8")),
        len: u32::from_be_bytes(bytes[24..28].try_into().expect("4")),
    })
}

pub fn simple_reply_header(error: u32, handle: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

/// The header of one structured reply chunk; `len` bytes of data follow.
pub fn structured_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
    out
}

/// A structured error chunk (final) with a message.
pub fn structured_error(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut out = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len() as u32).to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go_bytes(name: &str, info: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(info.len() as u16).to_be_bytes());
        for i in info {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    proptest::proptest! {
        /// Whatever bytes a client sends, the parsers answer with a value
        /// or an error; they never panic.
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_go(&data);
            let mut head = [0u8; OPTION_HEADER_BYTES];
            let n = data.len().min(OPTION_HEADER_BYTES);
            head[..n].copy_from_slice(&data[..n]);
            let _ = parse_option_header(&head);
            let mut req = [0u8; REQUEST_HEADER_BYTES];
            let n = data.len().min(REQUEST_HEADER_BYTES);
            req[..n].copy_from_slice(&data[..n]);
            let _ = parse_request(&req);
            let mut flags = [0u8; 4];
            let n = data.len().min(4);
            flags[..n].copy_from_slice(&data[..n]);
            let _ = parse_client_flags(flags);
        }
    }

    #[test]
    fn go_requests() {
        assert_eq!(parse_go(&go_bytes("d0", &[3, 0])).unwrap(), GoRequest { name: "d0".into(), info: vec![3, 0] });
        assert_eq!(parse_go(&go_bytes("", &[])).unwrap(), GoRequest { name: "".into(), info: vec![] });
        let mut long = go_bytes("d0", &[1]);
        long.push(0);
        assert!(parse_go(&long).is_err());
        let good = go_bytes("disk", &[1, 2]);
        for cut in 0..good.len() {
            assert!(parse_go(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = go_bytes("d", &[]);
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_go(&huge).is_err());
    }

    #[test]
    fn headers() {
        let mut opt = [0u8; OPTION_HEADER_BYTES];
        opt[..8].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
        opt[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        opt[12..].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(parse_option_header(&opt).unwrap(), OptionHeader { option: OPT_GO, len: 10 });
        opt[12..].copy_from_slice(&(OPTION_BYTES_MAX + 1).to_be_bytes());
        assert_eq!(parse_option_header(&opt), Err(ProtocolError::OptionTooLarge(OPTION_BYTES_MAX + 1)));
        opt[0] = 0;
        assert!(matches!(parse_option_header(&opt), Err(ProtocolError::BadOptionMagic(_))));
        assert!(parse_client_flags([0, 0, 0, 3]).is_ok());
        assert!(parse_client_flags([0, 0, 0, 4]).is_err());
        let mut req = [0u8; REQUEST_HEADER_BYTES];
        req[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        req[8..16].copy_from_slice(&7u64.to_be_bytes());
        req[16..24].copy_from_slice(&4096u64.to_be_bytes());
        req[24..].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(parse_request(&req).unwrap(), Request { flags: 0, kind: CMD_WRITE, handle: 7, offset: 4096, len: 512 });
        req[0] = 1;
        assert!(parse_request(&req).is_err());
        assert_eq!(greeting()[..8], *b"NBDMAGIC");
        assert_eq!(greeting()[8..16], *b"IHAVEOPT");
    }
}
